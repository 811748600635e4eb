"""Runtime policy: load a teacher or student weights directory and turn observations into
un-normalised action chunks, reporting what the backbone executed and what it cost.

This is what the ROS node, the simulator evaluation and the benchmarks call. The chunk is what the
model predicts, not clamped: the limits of an arm are the safety contract's (actdistill_ros.control),
and the simulator clips to its own action space.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actdistill_ros import __version__
from actdistill_ros.data.images import resize_rgb
from actdistill_ros.policies.actdistill import (RouterConfig, RoutedStudent, backbone_flops, num_kept_layers,
                                               run_backbone)
from actdistill_ros.policies.common import checked_keep_fraction, checked_threshold
from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
from actdistill_ros.weights import (ActionSpace, ModelCard, WeightsError, identity_norm_stats, load_state_into,
                                    read_card, read_weights, resolve_weights_path, save_policy)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" without a GPU -> cpu with one warning."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is not available: running on CPU", device)
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device.type == "cpu" and dtype != "float32":
        log.warning("dtype %s is for CUDA; using float32 on CPU", dtype)
        return torch.float32
    return DTYPES[dtype]


def build_model(card: ModelCard, weights_dir: str | Path | None = None,
                trust_remote_code: bool = False) -> ReferenceVLA | RoutedStudent:
    """The (randomly initialised) module a card describes, with its normalisation loaded.

    An hf_vla card also needs its ``weights_dir``, whose backbone/ holds the transformers config
    and tokenizer (read offline). ``trust_remote_code`` allows a backbone whose code ships in that
    directory (never on by default).
    """
    if card.family in ("smolvla", "pi0"):
        raise ValueError(f"a {card.family} card is served from its LeRobot policy directory (config.json, "
                         "model.safetensors, the processor files): load that directory")
    if card.family == "hf_vla":
        from actdistill_ros.policies.hf_vla import HFVLA, HFVLAConfig  # transformers only when needed

        if weights_dir is None:
            raise ValueError("an hf_vla card is rebuilt from its weights directory (backbone/); none was given")
        vla = HFVLA.from_weights_dir(Path(weights_dir), HFVLAConfig.from_dict(card.vla_config), trust_remote_code)
    else:
        vla = ReferenceVLA(VLAConfig.from_dict(card.vla_config))
    vla.set_normalization(card.norm_stats)
    if card.is_student:
        student = RoutedStudent(vla, RouterConfig.from_dict(card.router_config))
        student.threshold = card.default_threshold
        student.keep_fraction = card.default_keep_fraction
        return student
    return vla


def evenly_spaced_layers(k: int, num_layers: int) -> list[int]:
    """k of num_layers layers, evenly spaced and always the last (it feeds the action head): layer
    i*L/k - 1 for i = 1..k, rounded half up; the spacing L/k >= 1 makes them distinct."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"evenly spaced layers: k = {k} must be in 1..{num_layers}")
    return (np.floor(np.arange(1, k + 1) * num_layers / k + 0.5).astype(int) - 1).tolist()


class StaticRoute:
    """A training-free baseline route: a teacher runs k = max(1, round(keep * L)) of its L layers.

    "first": layers 0..k-1 (the teacher truncated); "even": k evenly spaced layers, always
    including the last (it feeds the action head); "random": k layers drawn afresh for every
    observation from a generator seeded with ``seed``.
    """

    KINDS = ("first", "even", "random")

    def __init__(self, kind: str, keep_fraction: float, num_layers: int, seed: int = 0):
        if kind not in self.KINDS:
            raise ValueError(f"static route {kind!r}: expected one of {', '.join(self.KINDS)}")
        self.kind, self.num_layers = kind, num_layers
        self.k = num_kept_layers(keep_fraction, num_layers)
        self.generator = torch.Generator().manual_seed(seed)
        self.fixed_layers = (list(range(self.k)) if kind == "first" else evenly_spaced_layers(self.k, num_layers)
                             if kind == "even" else None)

    def mask(self, batch: int) -> torch.Tensor:
        """(batch, L) bool execute mask, on the CPU."""
        if self.fixed_layers is None:
            drawn = torch.rand(batch, self.num_layers, generator=self.generator).argsort(-1)[:, :self.k]
            return torch.zeros(batch, self.num_layers, dtype=torch.bool).scatter_(-1, drawn, True)
        execute = torch.zeros(batch, self.num_layers, dtype=torch.bool)
        execute[:, self.fixed_layers] = True
        return execute


@dataclass
class PolicyOutput:
    actions: np.ndarray  # (H, D) float32, un-normalised as predicted (not clamped to any limit)
    executed_layers: list[int]
    executed_fraction: float
    backbone_gflops: float  # what this sample's backbone cost
    full_backbone_gflops: float  # what running every layer would cost
    # For the whole call: total; with Policy.profile also encode (with routing), backbone, head.
    timings_ms: dict[str, float]
    gates: list[float] | None = None  # router gates (students only)


class Policy:
    def __init__(self, model: ReferenceVLA | RoutedStudent, card: ModelCard, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.card = card
        self.device = device
        self.dtype = dtype
        self.model = model.to(device=device, dtype=dtype).eval()
        self.student = model if isinstance(model, RoutedStudent) else None
        self.vla: ReferenceVLA = model.vla if self.student else model
        # Normalisation buffers stay float32 for accuracy whatever the compute dtype.
        for name in ("action_mean", "action_std", "state_mean", "state_std"):
            setattr(self.vla, name, getattr(self.vla, name).float())
        # Per-stage timings need the device drained after each stage (a sync per stage): only
        # benchmarks turn this on; an inference otherwise waits for the device once.
        self.profile = False
        # Backbone GFLOPs of one sample by the number of layers it runs.
        self._backbone_gflops = [backbone_flops(self.vla, k) / 1e9 for k in range(self.vla.num_layers + 1)]
        self._static_route: StaticRoute | None = None

    @classmethod
    def load(cls, weights_path: str | Path, device: str = "auto", dtype: str = "float32",
             trust_remote_code: bool = False) -> "Policy":
        from actdistill_ros.lerobot_card import LeRobotCardError, lerobot_card_json

        try:
            lerobot = lerobot_card_json(weights_path) is not None
        except LeRobotCardError as err:
            raise WeightsError(str(err)) from None
        if lerobot:  # a LeRobot SmolVLA / pi0 / pi0.5 teacher or a student of one
            from actdistill_ros.policies.smolvla.serving_smolvla import FlowServing

            return FlowServing.load(weights_path, device, dtype)
        weights_file, card_file = resolve_weights_path(weights_path)
        card = read_card(card_file)
        try:
            model = build_model(card, weights_file.parent, trust_remote_code)
        except (TypeError, ValueError, OSError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightsError(f"{card_file}: invalid architecture in card: {message}") from None
        load_state_into(model, read_weights(weights_file), weights_file)
        torch_device = resolve_device(device)
        return cls(model, card, torch_device, resolve_dtype(dtype, torch_device))

    # ---- run-time knobs ------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self.student.threshold if self.student else 0.0

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = checked_threshold(value)
        if self.student:
            self.student.threshold = value

    @property
    def keep_fraction(self) -> float:
        """> 0: each observation runs its top max(1, round(keep * L)) layers by gate; 0.0: threshold routing."""
        return self.student.keep_fraction if self.student else 0.0

    @keep_fraction.setter
    def keep_fraction(self, value: float | None) -> None:
        keep = checked_keep_fraction(value)
        if self.student:
            self.student.keep_fraction = keep

    @property
    def static_route(self) -> StaticRoute | None:
        """A teacher's training-free baseline route (``StaticRoute``); None runs every layer."""
        return self._static_route

    @static_route.setter
    def static_route(self, route: StaticRoute | None) -> None:
        if route is not None and self.student:
            raise ValueError("static routes are baselines for teacher weights; "
                             "this policy is a student (it routes itself)")
        if route is not None and route.num_layers != self.num_layers:
            raise ValueError(f"static route over {route.num_layers} layers; this policy has {self.num_layers}")
        self._static_route = route

    @property
    def num_layers(self) -> int:
        return self.vla.num_layers

    @property
    def num_cameras(self) -> int:
        """Images per observation, in the order of ``card.camera_names``."""
        return self.vla.config.num_cameras

    # ---- inference -----------------------------------------------------------------------
    def _stage_mark(self) -> float:
        """A profiled stage boundary: wait for the device (a host sync on a GPU), then read the clock."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device without the host waiting for the device: a blocking copy
        would drain the GPU first. Pinned memory makes the copy truly asynchronous."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def predict_batch(self, images, instructions: list[str], states=None) -> list[PolicyOutput]:
        """images: a uint8 RGB array (B, C, h, w, 3), or (B, h, w, 3) with one camera; or a list
        with one entry per sample, each a list of C frames (h, w, 3) in camera order, or one frame
        with one camera. Frames may have any size: each is resized with ``resize_rgb``.

        The host waits for the device once to read the result, and a student once more before its
        backbone, to read its route (gates and layers in one copy): which layers run is decided
        on the host. With ``profile`` set, each stage is timed behind a sync of its own.
        """
        profile = self.profile
        t0 = self._stage_mark() if profile else time.perf_counter()
        frames = _stack_images(images, self.vla.config.image_size, self.num_cameras)
        batch, num_layers = len(frames), self.num_layers
        pixels = self._to_device(frames)
        state_tensor = self._state_tensor(states, batch)
        encoded = self.vla.encode(pixels, list(instructions), state_tensor)
        gates_np = None
        if self.student:
            gates, execute = self.student.execute_mask(encoded)
            # The route's one copy to the host: run_backbone then reads the host mask for free.
            route = torch.cat([gates.float(), execute.float()], dim=-1).cpu().numpy()
            gates_np, execute_np = route[:, :num_layers], route[:, num_layers:] > 0.5
            execute = torch.from_numpy(execute_np)
        elif self._static_route is not None:
            execute = self._static_route.mask(batch)  # made on the host: nothing to read back
            execute_np = execute.numpy()
        else:
            execute, execute_np = None, np.ones((batch, num_layers), bool)
        t1 = self._stage_mark() if profile else 0.0
        readout = run_backbone(self.vla, encoded, execute)
        t2 = self._stage_mark() if profile else 0.0
        chunk = self.vla.unnormalize_actions(self.vla.predict_chunk(readout).float())
        actions = chunk.cpu().numpy()  # the result: the one read every inference needs
        t3 = time.perf_counter()
        timings = {"total": (t3 - t0) * 1e3}
        if profile:
            timings.update(encode=(t1 - t0) * 1e3, backbone=(t2 - t1) * 1e3, head=(t3 - t2) * 1e3)
        outputs = []
        for row in range(batch):
            layers = np.flatnonzero(execute_np[row]).tolist()
            outputs.append(PolicyOutput(
                actions=actions[row], executed_layers=layers, executed_fraction=len(layers) / num_layers,
                backbone_gflops=self._backbone_gflops[len(layers)],
                full_backbone_gflops=self._backbone_gflops[num_layers], timings_ms=timings,
                gates=None if gates_np is None else gates_np[row].tolist()))
        return outputs

    def predict(self, images, instruction: str, state: np.ndarray | None = None) -> PolicyOutput:
        """images: a list of C uint8 RGB frames (h, w, 3) in camera order (any size), or one
        frame when the policy has one camera."""
        states = None if state is None else np.asarray(state, dtype=np.float32)[None]
        return self.predict_batch([images], [instruction], states)[0]

    def _state_tensor(self, states, batch: int) -> torch.Tensor | None:
        state_dim = self.vla.config.state_dim
        if state_dim == 0:
            return None
        if states is None:
            raise ValueError(f"this policy needs a robot state of {state_dim} values per observation")
        array = np.asarray(states, dtype=np.float32)
        if array.shape != (batch, state_dim):
            raise ValueError(f"state must have shape ({batch}, {state_dim}), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("state contains NaN or inf")
        return self._to_device(np.ascontiguousarray(array))


def _camera_frames(sample, num_cameras: int) -> list:
    """One observation's images -> its list of per-camera frames, checking the camera count."""
    if isinstance(sample, np.ndarray) and sample.ndim == 3:
        frames = [sample]  # a single frame
    elif (isinstance(sample, np.ndarray) and sample.ndim == 4) or isinstance(sample, (list, tuple)):
        frames = list(sample)
    else:
        raise ValueError(f"images: expected a list of {num_cameras} uint8 (h, w, 3) RGB frame(s) per observation, "
                         f"got {type(sample).__name__} {getattr(sample, 'shape', '')}")
    if len(frames) != num_cameras:
        raise ValueError(f"images: this policy takes {num_cameras} camera image(s) per observation, got {len(frames)}")
    return frames


def _stack_images(images, size: int, num_cameras: int) -> np.ndarray:
    """Observations (see Policy.predict_batch) -> one uint8 (B, C, size, size, 3) array; every frame
    not already size x size goes through resize_rgb, the resize the training data went through."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and num_cameras == 1:
        images = images[:, None]
    if isinstance(images, np.ndarray) and images.ndim == 5:
        if images.shape[1] != num_cameras:
            raise ValueError(f"images: this policy takes {num_cameras} camera image(s) per observation, "
                             f"got an array of shape {images.shape}")
        if images.dtype == np.uint8 and images.shape[2:] == (size, size, 3):
            return np.ascontiguousarray(images)  # already model-sized: no per-frame work
    if isinstance(images, np.ndarray) and images.ndim not in (4, 5):
        raise ValueError(f"images: expected uint8 RGB (B, C, h, w, 3) or a list of observations, got shape {images.shape}")
    return np.stack([np.stack([resize_rgb(frame, size) for frame in _camera_frames(sample, num_cameras)])
                     for sample in images])


def make_card(model: ReferenceVLA | RoutedStudent, action_space: ActionSpace, norm_stats: dict | None = None,
              state_names: list[str] | None = None, provenance: dict | None = None,
              metrics: dict | None = None, camera_names: list[str] | None = None) -> ModelCard:
    student = model if isinstance(model, RoutedStudent) else None
    vla = student.vla if student else model
    config = vla.config
    if action_space.dim != config.action_dim:
        raise ValueError(f"action space has {action_space.dim} dimensions, the model predicts {config.action_dim}")
    return ModelCard(
        kind="student" if student else "teacher", vla_config=config.to_dict(), action_space=action_space,
        family=getattr(vla, "family", "reference_vla"),
        norm_stats=norm_stats or identity_norm_stats(config.action_dim, config.state_dim),
        router_config=student.router_config.to_dict() if student else None,
        default_threshold=student.threshold if student else 0.5, state_names=list(state_names or []),
        default_keep_fraction=student.keep_fraction if student else 0.0,
        camera_names=list(camera_names or []),
        provenance={"actdistill_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **(provenance or {})},
        metrics=metrics or {})


def save_model(out_dir: str | Path, model: ReferenceVLA | RoutedStudent, card: ModelCard) -> Path:
    vla = model.vla if isinstance(model, RoutedStudent) else model
    # An hf_vla model also writes its backbone's config and tokenizer (backbone/) beside the weights.
    return save_policy(out_dir, model.state_dict(), card, getattr(vla, "save_backbone_files", None))


def create_untrained_policy(out_dir: str | Path, size: str = "tiny", student: bool = True, keep: float = 0.5,
                            action_space: ActionSpace | None = None, state_dim: int = 4, seed: int = 0,
                            router_weight_std: float = 0.0, camera_names: list[str] | None = None,
                            backbone: str | Path | None = None) -> Path:
    """A randomly initialised teacher or student weights directory (tests, benchmarks, smoke runs).

    A student's router is biased to keep about ``keep`` of the layers at threshold 0.5;
    ``router_weight_std`` > 0 makes its gates depend on the input, so samples route differently.
    ``camera_names`` gives a model with one camera per name (default: one unnamed camera).
    ``backbone`` (a transformers model directory or hub id) wraps that model, weights kept, with
    fresh state/query/head, instead of a reference VLA of ``size``.
    """
    action_space = action_space or ActionSpace.metaworld()
    torch.manual_seed(seed)
    num_cameras = len(camera_names) if camera_names else 1
    if backbone is not None:
        from actdistill_ros.policies.hf_vla import HFVLA, HFVLAConfig

        vla = HFVLA.from_pretrained(backbone, HFVLAConfig(num_cameras=num_cameras, state_dim=state_dim,
                                                          action_dim=action_space.dim))
        size = f"backbone {backbone}"
    else:
        vla = ReferenceVLA(VLAConfig.sized(size, state_dim=state_dim, action_dim=action_space.dim,
                                           num_cameras=num_cameras))
    model: ReferenceVLA | RoutedStudent = vla
    if student:
        model = RoutedStudent.derive_from(vla, RouterConfig())
        model.router.bias_to_keep(keep)
        if router_weight_std > 0:
            torch.nn.init.normal_(model.router.gate.weight, std=router_weight_std)
    card = make_card(model, action_space, camera_names=camera_names,
                     provenance={"source": f"untrained ({size}, seed {seed}, keep {keep})"})
    return save_model(out_dir, model, card)
