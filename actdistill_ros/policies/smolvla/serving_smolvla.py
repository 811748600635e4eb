"""A LeRobot SmolVLA teacher, or a routed SmolVLA student, behind ``actdistill_ros.policy.Policy``'s
interface: what the policy node, the replay tools and the simulator call.

``Policy.load(dir)`` returns a ``SmolVLAServing`` for a directory whose config.json says "type":
"smolvla": LeRobot's own policy directory (the teacher, every layer, for comparison) or a student
written by ``actdistill distill`` (card.json of family smolvla, kind student, with its router). Its
card is made from the directory's files (actdistill_ros.lerobot_card): the cameras are the
``observation.images.*`` keys in config order, the action units "unknown" until a sidecar names
them, so the node commands nothing before ``action.scale`` is set.

Per inference:
- Frames: uint8 RGB (h, w, 3) in the card's camera order, any size. Each becomes what LeRobot's
  dataset pipeline hands the policy, float32 [1, 3, h, w] = frame / 255 at its own size; the policy
  resizes with padding to ``resize_imgs_with_padding`` as LeRobot does.
- Noise: the flow-matching start noise comes from a generator seeded with ``noise_seed`` (0)
  afresh for every inference, so one observation always gives one chunk, and that chunk is
  exactly ``actdistill predict``'s with its default ``--seed 0``.
- Actions: the first ``n_action_steps`` rows of the un-normalised chunk (what LeRobot executes of
  each chunk), in the policy's action units.
- Routing: a student runs its router over the first L - 1 VLM text layers (the last one only
  gives keys/values) at ``keep_fraction`` (> 0: the top max(1, round(keep x (L - 1))) layers by
  gate) or ``threshold``, the same dial as the reference VLA's. A teacher runs every layer;
  the dial is accepted and does nothing. ``backbone_gflops`` are the VLM prefix's FLOPs as run
  (compute_smolvla: skipped layers still project their keys/values), ``chunk_gflops`` the
  whole chunk's (vision per camera + prefix + every denoising step).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from actdistill_ros.lerobot_card import LeRobotCardError, smolvla_card_json
from actdistill_ros.policies.common import checked_keep_fraction, checked_threshold
from actdistill_ros.policies.smolvla.compute_smolvla import SmolVLASizes, chunk_flops, run_prefix_routed
from actdistill_ros.policies.smolvla.configuration_smolvla import STATE_KEY, SmolVLAConfigError
from actdistill_ros.policies.smolvla.modeling_smolvla import WeightsMismatch
from actdistill_ros.policies.smolvla.policy_smolvla import SmolVLAPolicy
from actdistill_ros.policies.smolvla.processor_smolvla import ProcessorError, unnormalize_actions
from actdistill_ros.weights import ModelCard, WeightsError

log = logging.getLogger(__name__)

VLM_PROCESSOR_DIR = "vlm_processor"  # a directory's own copy of the VLM's config and tokenizer


class SmolVLAServing:
    family = "smolvla"

    def __init__(self, policy: SmolVLAPolicy, card: ModelCard, device: torch.device, routed=None):
        self.policy = policy
        self.model = policy.model
        self.card = card
        self.device = device
        self.routed = routed  # RoutedSmolVLA of a student, None for the teacher
        self.student = routed
        config = policy.config
        self.cameras = list(card.camera_names)
        self.noise_seed = 0
        self.profile = False
        self.vla = SimpleNamespace(config=SimpleNamespace(
            image_size=card.image_size, num_cameras=len(self.cameras), state_dim=config.state_dim,
            action_dim=config.action_dim, chunk_size=config.n_action_steps))
        self.sizes = SmolVLASizes.of(self.model)
        text = self.model.vlm.text_model
        self.dtype = next(text.parameters()).dtype

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", dtype: str = "float32",
             vlm_processor: str | Path | None = None) -> "SmolVLAServing":
        """A LeRobot SmolVLA directory (teacher) or a SmolVLA student directory. The VLM's config and
        tokenizer: ``vlm_processor``, else the directory's own vlm_processor/, else the Hugging Face
        cache of its vlm_model_name (offline). Errors are one line (WeightsError / ValueError)."""
        from actdistill_ros.policy import resolve_device

        directory = Path(directory).expanduser()
        try:
            data = smolvla_card_json(directory)
            if data is None:
                raise WeightsError(f"{directory}: not a LeRobot SmolVLA policy directory (config.json with "
                                   f"\"type\": \"smolvla\" and no card of another family)")
        except LeRobotCardError as err:
            raise WeightsError(str(err)) from None
        torch_device = resolve_device(device)
        if dtype != "float32":
            log.warning("dtype %s: a SmolVLA runs each part in the dtype LeRobot runs it in (see docs/SMOLVLA.md); "
                        "ignoring it", dtype)
        own = directory / VLM_PROCESSOR_DIR
        processor = vlm_processor if vlm_processor is not None else (own if own.is_dir() else None)
        routed = None
        try:
            if data["kind"] == "student":
                from actdistill_ros.policies.smolvla.routing_smolvla import load_smolvla_student

                student = load_smolvla_student(directory, processor, device=torch_device)
                policy, routed = student, student.routed
            else:
                policy = SmolVLAPolicy.load(directory, processor, device=torch_device)
        except (ProcessorError, SmolVLAConfigError, WeightsMismatch) as err:  # one line, as the node prints it
            hint = (f" (the node and Policy.load also read them from {own}/)"
                    if processor is None and "--vlm-processor" in str(err) else "")
            raise WeightsError(f"{err}{hint}") from None
        # The card's layer count is what RouterStats count: the routed layers, all but the last
        # (a student card may give the VLM's kept layers; num_vlm_layers 0 leaves it to the model).
        data = {**data, "vla_config": {**data["vla_config"], "num_layers": policy.model.num_vlm_layers - 1}}
        try:
            card = ModelCard.from_dict(data)
        except (TypeError, ValueError, KeyError) as err:
            raise WeightsError(f"{directory}: invalid SmolVLA card: {err}") from None
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
            raise ValueError("static routes are baselines of the reference VLA's teachers; a SmolVLA teacher runs "
                             "every layer (distil a student to route it)")

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
        gates = None
        if self.routed is not None:
            from actdistill_ros.policies.smolvla.routing_smolvla import routed_denoise_step, routed_prefix

            gate_tensor, plan = self.routed.route(prefix)
            gates = gate_tensor.float().cpu().numpy()
            cache, expert_skip = routed_prefix(self.model, prefix, plan, self.routed.kv_mode)
        else:
            plan, expert_skip = [[True] * last for _ in range(size)], None
            cache = run_prefix_routed(self.model, prefix, None)  # exactly SmolVLAModel.run_prefix
        t2 = self._mark() if self.profile else 0.0
        steps, dt = self.model.config.num_steps, -1.0 / self.model.config.num_steps
        context = self.model.suffix_context(cache, self.model.config.chunk_size)
        x_t = noise
        for step in range(steps):  # SmolVLAModel.sample_actions' Euler steps
            time_value = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=noise.device).expand(size)
            velocity = (self.model.denoise_step(x_t, time_value, cache, context) if expert_skip is None
                        else routed_denoise_step(self.model, x_t, time_value, cache, context, expert_skip))
            x_t = x_t + dt * velocity
        actions = unnormalize_actions(self.policy.postprocessor, x_t[:, :, :self.policy.config.action_dim])
        actions = actions.float().cpu().numpy()[:, :self.policy.config.n_action_steps]
        t3 = time.perf_counter()
        timings = {"total": (t3 - t0) * 1e3}
        if self.profile:
            timings.update(encode=(t1 - t0) * 1e3, backbone=(t2 - t1) * 1e3, head=(t3 - t2) * 1e3)
        hws = [tuple(batch[key].shape[2:]) for key in self.cameras]
        full = chunk_flops(self.sizes, hws, 0, None, padded_to=prefix.embeddings.shape[1])
        outputs = []
        for row in range(size):
            layers = [i for i, run in enumerate(plan[row]) if run]
            routed_flops = chunk_flops(self.sizes, hws, 0, plan[row] + [True], padded_to=prefix.embeddings.shape[1])
            outputs.append(PolicyOutput(
                actions=actions[row], executed_layers=layers, executed_fraction=len(layers) / last,
                backbone_gflops=routed_flops.prefix / 1e9, full_backbone_gflops=full.prefix / 1e9,
                timings_ms=timings, gates=None if gates is None else gates[row].tolist()))
            outputs[-1].chunk_gflops = routed_flops.total / 1e9
        return outputs

    def predict(self, images, instruction: str, state: np.ndarray | None = None):
        """images: the cameras' uint8 RGB frames (h, w, 3) in card.camera_names order."""
        states = None if state is None else np.asarray(state, dtype=np.float32)[None]
        return self.predict_batch([images], [instruction], states)[0]
