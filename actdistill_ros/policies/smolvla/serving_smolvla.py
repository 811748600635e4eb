"""A LeRobot flow-matching teacher (SmolVLA, pi0, pi0.5), or a routed student of one, behind
``actdistill_ros.policy.Policy``'s interface: what the policy node, the replay tools and the
simulator call.

``Policy.load(dir)`` returns a ``FlowServing`` for a directory whose config.json says "type":
"smolvla", "pi0" or "pi05": LeRobot's own policy directory (the teacher, every layer, for
comparison) or a student written by ``actdistill distill`` (card.json of its family, kind student,
with its router). Its
card is made from the directory's files (actdistill_ros.lerobot_card): the cameras are the
``observation.images.*`` keys in config order, the action units "unknown" until a sidecar names
them, so the node commands nothing before ``action.scale`` is set.

Per inference:
- Frames: uint8 RGB (h, w, 3) in the card's camera order, any size. Each becomes what LeRobot's
  dataset pipeline hands the policy, float32 [1, 3, h, w] = frame / 255 at its own size; the policy
  resizes with padding (``resize_imgs_with_padding``; pi0: ``image_resolution``) as LeRobot does.
- Noise: the flow-matching start noise comes from a generator seeded with ``noise_seed`` (0)
  afresh for every inference, so one observation always gives one chunk, and that chunk is
  exactly ``actdistill predict``'s with its default ``--seed 0``.
- Actions: the first ``n_action_steps`` rows of the un-normalised chunk (what LeRobot executes of
  each chunk), in the policy's action units.
- Routing: a student runs its router over the first L - 1 VLM text layers (the last one only
  gives keys/values) at ``keep_fraction`` (> 0: the top max(1, round(keep x (L - 1))) layers by
  gate) or ``threshold``, the same dial as the reference VLA's. A teacher runs every layer;
  the dial is accepted and does nothing. ``backbone_gflops`` are the VLM prefix's FLOPs as run
  (skipped layers still project their keys/values), ``chunk_gflops`` the whole chunk's (vision per
  camera + prefix + every denoising step): SmolVLA's from compute_smolvla's formulas, pi0's counted
  once per model on what runs (compute_pi0.PI0RouteCosts, at the first inference).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from actdistill_ros.lerobot_card import LeRobotCardError, lerobot_card_json
from actdistill_ros.policies.common import checked_keep_fraction, checked_threshold
from actdistill_ros.policies.flow_family import family_named
from actdistill_ros.policies.pi0.configuration_pi0 import PI0ConfigError
from actdistill_ros.policies.smolvla.compute_smolvla import SmolVLASizes, chunk_flops
from actdistill_ros.policies.smolvla.configuration_smolvla import STATE_KEY, SmolVLAConfigError
from actdistill_ros.policies.smolvla.modeling_smolvla import WeightsMismatch
from actdistill_ros.policies.smolvla.processor_smolvla import ProcessorError, unnormalize_actions
from actdistill_ros.policies.smolvla.routing_smolvla import KV_PROJECT
from actdistill_ros.weights import ModelCard, WeightsError

log = logging.getLogger(__name__)

VLM_PROCESSOR_DIR = "vlm_processor"  # a directory's own copy of the VLM's config and tokenizer


class FlowServing:
    def __init__(self, policy, card: ModelCard, device: torch.device, routed=None):
        self.policy = policy
        self.family = policy.family  # "smolvla" or "pi0"
        self.ops = family_named(self.family).hooks().routed.ops  # the family's per-layer functions
        self.model = policy.model
        self.card = card
        self.device = device
        self.routed = routed  # the RoutedFlowStudent of a student, None for the teacher
        self.student = routed
        config = policy.config
        self.cameras = list(card.camera_names)
        self.noise_seed = 0
        self.profile = False
        self.vla = SimpleNamespace(config=SimpleNamespace(
            image_size=card.image_size, num_cameras=len(self.cameras), state_dim=config.state_dim,
            action_dim=config.action_dim, chunk_size=config.n_action_steps))
        if self.family == "smolvla":
            self.sizes = SmolVLASizes.of(self.model)
            self.dtype = next(self.model.vlm.text_model.parameters()).dtype
        else:  # pi0 runs in float32 (PI0Policy.load)
            self.sizes, self.dtype = None, torch.float32
        self._route_costs = {}  # pi0: prefix length -> PI0RouteCosts

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", dtype: str = "float32",
             vlm_processor: str | Path | None = None) -> "FlowServing":
        """A LeRobot SmolVLA / pi0 / pi0.5 directory (teacher) or a student directory of one. The VLM's
        tokenizer (and SmolVLA's VLM config): ``vlm_processor``, else the directory's own
        vlm_processor/, else the Hugging Face cache of the name the policy gives (offline). Errors
        are one line (WeightsError / ValueError)."""
        from actdistill_ros.policy import resolve_device

        directory = Path(directory).expanduser()
        try:
            data = lerobot_card_json(directory)
            if data is None:
                raise WeightsError(f"{directory}: not a LeRobot SmolVLA, pi0 or pi0.5 policy directory (config.json "
                                   f"with \"type\" smolvla, pi0 or pi05 and no card of another family)")
        except LeRobotCardError as err:
            raise WeightsError(str(err)) from None
        torch_device = resolve_device(device)
        if dtype != "float32":
            log.warning("dtype %s: a LeRobot SmolVLA / pi0 runs each part in the dtype LeRobot runs it in "
                        "(docs/SMOLVLA.md, docs/PI0.md); ignoring it", dtype)
        own = directory / VLM_PROCESSOR_DIR
        processor = vlm_processor if vlm_processor is not None else (own if own.is_dir() else None)
        routed = None
        # SmolVLA runs each part in LeRobot's dtype; pi0 runs in float32 (a dtype bfloat16 pi0's
        # bfloat16 run is not reproduced: predict needs --float32 for it, the node says so below).
        float32 = data["family"] == "pi0"
        try:
            if data["kind"] == "student":
                from actdistill_ros.policies.smolvla.routing_smolvla import load_student

                student = load_student(directory, processor, device=torch_device, float32=float32)
                policy, routed = student, student.routed
            else:
                policy = family_named(data["family"]).hooks().policy.load(directory, processor, device=torch_device,
                                                                          float32=float32)
            if float32 and policy.config.dtype != "float32":
                log.warning("%s: dtype %s: LeRobot runs its VLM and expert in that dtype; served here in float32",
                            directory, policy.config.dtype)
        except (ProcessorError, SmolVLAConfigError, PI0ConfigError, WeightsMismatch) as err:  # one line (the node's)
            hint = (f" (the node and Policy.load also read them from {own}/)"
                    if processor is None and "--vlm-processor" in str(err) else "")
            raise WeightsError(f"{err}{hint}") from None
        # The card's layer count is what RouterStats count: the routed layers, all but the last
        # (a student card may give the VLM's kept layers; num_vlm_layers 0 leaves it to the model).
        data = {**data, "vla_config": {**data["vla_config"], "num_layers": policy.model.num_vlm_layers - 1}}
        try:
            card = ModelCard.from_dict(data)
        except (TypeError, ValueError, KeyError) as err:
            raise WeightsError(f"{directory}: invalid {data['family']} card: {err}") from None
        return cls(policy, card, torch_device, routed)

    # ---- the run-time dial -----------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self.routed.threshold if self.routed is not None else 0.0

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = checked_threshold(value)
        if self.routed is not None:
            self.routed.threshold = value

    @property
    def keep_fraction(self) -> float:
        return self.routed.keep_fraction if self.routed is not None else 0.0

    @keep_fraction.setter
    def keep_fraction(self, value: float | None) -> None:
        keep = checked_keep_fraction(value)
        if self.routed is not None:
            self.routed.keep_fraction = keep

    @property
    def static_route(self):
        return None

    @static_route.setter
    def static_route(self, route) -> None:
        if route is not None:
            raise ValueError(f"static routes are baselines of the reference VLA's teachers; a {self.family} teacher "
                             f"runs every layer (distil a student to route it)")

    @property
    def num_layers(self) -> int:
        """Routed VLM layers: all but the last, which only gives keys/values."""
        return self.model.num_vlm_layers - 1

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    # ---- inference -------------------------------------------------------------------------------
    def batch_of(self, images, states) -> dict[str, torch.Tensor]:
        """Observations (a list, one entry per sample, of the cameras' uint8 frames) -> LeRobot's raw
        batch: observation.images.<camera> float32 [B, 3, h, w] = frame / 255, observation.state."""
        if isinstance(images, np.ndarray) and images.ndim == 3 and self.num_cameras == 1:
            images = [[images]]
        samples = [[sample] if isinstance(sample, np.ndarray) and sample.ndim == 3 else list(sample)
                   for sample in images]
        batch = {}
        for index, key in enumerate(self.cameras):
            frames = []
            for sample in samples:
                if len(sample) != self.num_cameras:
                    raise ValueError(f"images: this policy takes {self.num_cameras} camera image(s) per observation "
                                     f"({self.cameras}), got {len(sample)}")
                frame = np.asarray(sample[index])
                if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                    raise ValueError(f"images: {key} must be a uint8 RGB (h, w, 3) frame, got {frame.dtype} "
                                     f"{frame.shape}")
                frames.append(torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1))
            if len({tuple(f.shape) for f in frames}) != 1:
                raise ValueError(f"images: the {key} frames of one batch differ in size")
            batch[key] = torch.stack(frames).to(torch.float32) / 255  # LeRobot's decoded frames
        state_dim = self.policy.config.state_dim
        if states is None:
            raise ValueError(f"this policy needs a robot state of {state_dim} values per observation "
                             f"(observation.state)")
        array = np.asarray(states, dtype=np.float32)
        if array.shape != (len(samples), state_dim):
            raise ValueError(f"state must have shape ({len(samples)}, {state_dim}), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("state contains NaN or inf")
        batch[STATE_KEY] = torch.from_numpy(array.copy())
        return batch

    def _mark(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.inference_mode()
    def predict_batch(self, images, instructions: list[str], states=None):
        from actdistill_ros.policy import PolicyOutput

        t0 = self._mark() if self.profile else time.perf_counter()
        batch = self.batch_of(images, states)
        prefix, size = self.policy.preprocess(batch, list(instructions))
        noise = self.policy.start_noise(size, torch.Generator().manual_seed(self.noise_seed))
        t1 = self._mark() if self.profile else 0.0
        last = self.model.num_vlm_layers - 1
        gates, kv_mode = None, self.routed.kv_mode if self.routed is not None else KV_PROJECT
        if self.routed is not None:
            gate_tensor, plan = self.routed.route(prefix)
            gates = gate_tensor.float().cpu().numpy()
            cache, expert_skip = self.ops.routed_prefix(self.model, prefix, plan, kv_mode)
        else:
            plan = [[True] * last for _ in range(size)]
            cache, expert_skip = self.ops.routed_prefix(self.model, prefix, None)  # exactly the model's run_prefix
        t2 = self._mark() if self.profile else 0.0
        x_t = self.ops.integrate(self.model, cache, noise, expert_skip)  # the model's sample_actions' Euler steps
        actions = unnormalize_actions(self.policy.postprocessor, x_t[:, :, :self.policy.config.action_dim])
        actions = actions.float().cpu().numpy()[:, :self.policy.config.n_action_steps]
        t3 = time.perf_counter()
        timings = {"total": (t3 - t0) * 1e3}
        if self.profile:
            timings.update(encode=(t1 - t0) * 1e3, backbone=(t2 - t1) * 1e3, head=(t3 - t2) * 1e3)
        hws = [tuple(batch[key].shape[2:]) for key in self.cameras]
        flops = self._chunk_flops(prefix, hws, kv_mode)
        full = flops(None)
        outputs = []
        for row in range(size):
            layers = [i for i, run in enumerate(plan[row]) if run]
            routed_flops = flops(plan[row])
            outputs.append(PolicyOutput(
                actions=actions[row], executed_layers=layers, executed_fraction=len(layers) / last,
                backbone_gflops=routed_flops["prefix"] / 1e9, full_backbone_gflops=full["prefix"] / 1e9,
                timings_ms=timings, gates=None if gates is None else gates[row].tolist()))
            outputs[-1].chunk_gflops = routed_flops["total"] / 1e9
        return outputs

    def _chunk_flops(self, prefix, hws: list[tuple[int, int]], kv_mode: str):
        """route (over the routed layers, None: all) -> {"prefix", "total"} FLOPs of one observation."""
        if self.family == "smolvla":
            def smolvla(plan):
                counted = chunk_flops(self.sizes, hws, 0, None if plan is None else plan + [True],
                                      padded_to=prefix.embeddings.shape[1])
                return {"prefix": counted.prefix, "total": counted.total}
            return smolvla
        length = prefix.embeddings.shape[1]
        if length not in self._route_costs:  # shapes alone set the counts: count once, on this prefix's first row
            from actdistill_ros.policies.pi0.compute_pi0 import PI0RouteCosts
            from actdistill_ros.policies.pi0.modeling_pi0 import Prefix

            one = Prefix(prefix.embeddings[:1], prefix.pad_masks[:1], prefix.num_image_tokens,
                         None if prefix.state is None else prefix.state[:1])
            resolution = self.policy.config.image_resolution[0]
            images = [torch.zeros(1, 3, resolution, resolution, device=self.device)
                      for _ in self.policy.config.image_features]  # LeRobot runs the tower on placeholders too
            self._route_costs[length] = PI0RouteCosts(self.model, one, images)
        costs = self._route_costs[length]
        return lambda plan: costs.total(plan, kv_mode)

    def predict(self, images, instruction: str, state: np.ndarray | None = None):
        """images: the cameras' uint8 RGB frames (h, w, 3) in card.camera_names order."""
        states = None if state is None else np.asarray(state, dtype=np.float32)[None]
        return self.predict_batch([images], [instruction], states)[0]
