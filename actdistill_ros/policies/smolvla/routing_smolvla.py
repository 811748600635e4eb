"""ActDistill on a LeRobot SmolVLA: the project's router over the VLM's text layers.

The student is the SmolVLA itself (a copy of the teacher's weights) plus a
:class:`~actdistill_ros.policies.actdistill.LayerRouter` that reads the embedded prefix (image and
task tokens) once per chunk and gates the VLM text layers; the vision tower, the projections and
the action expert always run (METHOD.md, "Flow-matching teachers").

What is routed. The last kept VLM layer never computes its output: the expert reads only its
keys/values (``SmolVLAModel.run_prefix``). So the router gates the first L - 1 layers (their
outputs feed the later layers), and keep routing runs ``max(1, round(keep * (L - 1)))`` of them.

A skipped layer still owes its expert layer keys/values. Three ways (``kv_mode``):

- ``project`` (the choice, measured in METHOD.md): project them from the hidden state the skipped
  layer would have received, which passes through unchanged: one RMSNorm and two projections, about
  the K/V share of the layer. An executed layer computes its keys/values from that same input, so
  in this mode a layer's keys/values never depend on whether it runs, and gating is purely the
  residual ``h <- h + m (F(h) - h)`` on the hidden state.
- ``reuse``: the previous layer's keys/values (projected when layer 0 is skipped). Free.
- ``skip_expert``: the paired expert layer is skipped as well (identity on the suffix) in every
  denoising step; the skipped VLM layer needs no keys/values at all.

Training runs every layer (for gradients) with the gates applied residually; inference runs a
layer only for the rows whose route includes it, so skipped layers cost what their ``kv_mode``
says and nothing else.

A student directory written by ``actdistill distill`` (distill_smolvla.py) loads with
``load_student``: a :class:`RoutedSmolVLAPolicy`, LeRobot's pre/post-processing around the routed
model, at the card's default keep fraction / threshold (the run-time dial).

Shared with pi0 / pi0.5 (policies/pi0/routing_pi0.py; the family interface is
policies/flow_family.py): :class:`RoutedFlowStudent` (the router and dial over any family's
per-layer ``ops``), :class:`RoutedPolicyMixin`, the student card and ``load_student``.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent
from actdistill_ros.policies.flow_family import FamilyHooks
from actdistill_ros.policies.observation import LANGUAGE, VISUAL, EncodedObservation, segment_spans
from actdistill_ros.policies.smolvla.configuration_smolvla import IMAGE_PREFIX, SmolVLAConfigError
from actdistill_ros.policies.smolvla.modeling_smolvla import (LayerKV, Prefix, PrefixCache, PrefixContext, Rotary,
                                                              SmolVLAModel, SuffixContext)
from actdistill_ros.policies.smolvla.policy_smolvla import CONFIG_FILE, SmolVLAPolicy
from actdistill_ros.policies.smolvla.processor_smolvla import ProcessorError, unnormalize_actions

KV_PROJECT, KV_REUSE, KV_SKIP_EXPERT = "project", "reuse", "skip_expert"
KV_MODES = (KV_PROJECT, KV_REUSE, KV_SKIP_EXPERT)
# A student directory (distill_smolvla.export_student): LeRobot's files plus these.
CARD_FILE = "card.json"
ROUTER_FILE = "router.safetensors"
VLM_PROCESSOR_DIR = "vlm_processor"
CARD_FORMAT = 1


def prefix_observation(prefix: Prefix) -> EncodedObservation:
    """The embedded prefix as the router reads it: image tokens (with their special tokens) are
    VISUAL, task tokens LANGUAGE; both may hold padding (an empty camera, padded task tokens)."""
    if len(prefix.segments) != prefix.embeddings.shape[1]:
        raise ValueError("the prefix carries no per-position segments (made by an older embed_prefix?)")
    segment = torch.tensor(prefix.segments, dtype=torch.long)
    return EncodedObservation(prefix.embeddings, prefix.pad_masks, segment, segment_spans(list(prefix.segments)),
                              frozenset({VISUAL, LANGUAGE}))


def _rows(value, rows: Tensor):
    """The batch rows ``rows`` of a prefix context, a cache entry or a suffix context."""
    if isinstance(value, Tensor):
        return value.index_select(0, rows)
    if isinstance(value, Rotary):
        return Rotary(_rows(value.cos, rows), _rows(value.sin, rows))
    if isinstance(value, PrefixContext):
        return PrefixContext(_rows(value.mask, rows), _rows(value.rotary, rows))
    if isinstance(value, LayerKV):
        return LayerKV(_rows(value.key, rows), _rows(value.value, rows))
    raise TypeError(type(value))


def _merge(full: Tensor | None, part: Tensor, rows: Tensor | None, batch: int) -> Tensor:
    """``part`` written into rows ``rows`` of ``full`` (created as zeros when None)."""
    if rows is None:
        return part
    if full is None:
        full = part.new_zeros((batch, *part.shape[1:]))
    return full.index_copy(0, rows, part)


class FlowBackbone(nn.Module):
    """A flow-matching VLA's model as the router sees a backbone: its VLM width and the number of
    routed layers (all VLM layers but the last, which only gives keys/values)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.num_vlm_layers < 2:
            raise SmolVLAConfigError(f"{model.config.source}: routing needs at least 2 VLM layers "
                                     f"(the last one only gives keys/values), got {model.num_vlm_layers}")
        self.model = model
        self.config = SimpleNamespace(width=model.width)

    @property
    def num_layers(self) -> int:
        return self.model.num_vlm_layers - 1


class RoutedFlowStudent(RoutedStudent):
    """A flow-matching VLA's model plus a router over its first L - 1 VLM layers; the family's
    per-layer functions are its ``ops`` (gated_prefix, routed_prefix, routed_denoise_step,
    sample_routed, integrate, each taking the model first).

    ``keep_fraction`` > 0 selects keep routing (the top-k layers by gate per observation), 0
    threshold routing at ``threshold``; ``execute_mask`` and ``train_routes`` are the project's.
    """

    ops: SimpleNamespace
    # A static student's fixed route over the routed layers (``distill --static-layers``): every
    # observation runs it, whatever the dial; None routes by the router.
    static_plan: list[bool] | None = None

    def __init__(self, model: nn.Module, router_config: RouterConfig, kv_mode: str = KV_PROJECT):
        super().__init__(FlowBackbone(model), router_config)
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {list(KV_MODES)}, got {kv_mode!r}")
        self.kv_mode = kv_mode

    @property
    def model(self):
        return self.vla.model

    @property
    def num_routed_layers(self) -> int:
        return self.vla.num_layers

    @classmethod
    def derive_from(cls, teacher: nn.Module, router_config: RouterConfig, kv_mode: str = KV_PROJECT):
        """Self-derived: a copy of the teacher's weights, all trainable, plus a fresh router."""
        model = copy.deepcopy(teacher)
        for param in model.parameters():
            param.requires_grad_(True)
        return cls(model, router_config, kv_mode).to(next(teacher.parameters()).device)

    def forward(self, *args, **kwargs):  # RoutedStudent.forward takes reference-VLA inputs
        raise TypeError(f"{type(self).__name__}: use sample_actions(prefix, noise) or gated_prefix(prefix, masks)")

    # ---- training: every layer computed, gated residually -------------------------------------
    def gated_prefix(self, prefix, masks: Tensor | None):
        """The prefix cache and the hidden state after each routed layer, with h <- h + m (F(h) - h)
        (``masks`` (B, L - 1); None runs every layer, the teacher's function). Keys/values of every
        layer come from its input, as in ``project`` mode (the mode trained here)."""
        if self.kv_mode != KV_PROJECT and masks is not None and not (
                self.kv_mode == KV_SKIP_EXPERT and self.static_plan is not None):
            raise ValueError(f"kv_mode {self.kv_mode!r} is an inference-time comparison; routed students are "
                             f"trained with kv_mode 'project' (static ones also with 'skip_expert')")
        return self.ops.gated_prefix(self.model, prefix, masks)

    # ---- inference: skipped layers not run -----------------------------------------------------
    def route(self, prefix, threshold: float | None = None, keep_fraction: float | None = None
              ) -> tuple[Tensor, list[list[bool]]]:
        """Gates (B, L - 1) and the route as host booleans (the one device read of routing)."""
        if self.static_plan is not None:
            batch = prefix.embeddings.shape[0]
            return self.fixed_masks(batch, prefix.embeddings.device), [list(self.static_plan)] * batch
        gates, execute = self.execute_mask(prefix_observation(prefix), threshold, keep_fraction)
        return gates, execute.to("cpu").tolist()

    def fixed_masks(self, batch: int, device) -> Tensor:
        """The static route as masks (batch, L - 1)."""
        return torch.tensor(self.static_plan, dtype=torch.float32, device=device).expand(batch, -1)

    def run_prefix(self, prefix, plan: list[list[bool]] | None):
        """The prefix cache with routed layer i run only for the rows whose ``plan[row][i]`` is
        True (None: all layers, as the teacher). Returns the cache and, for ``skip_expert``, which
        rows skip which expert layer (per VLM layer index, None otherwise)."""
        return self.ops.routed_prefix(self.model, prefix, plan, self.kv_mode)

    def denoise_step(self, noisy_actions: Tensor, time: Tensor, cache, context,
                     expert_skip: list[list[bool]] | None) -> Tensor:
        return self.ops.routed_denoise_step(self.model, noisy_actions, time, cache, context, expert_skip)

    def sample_actions(self, prefix, noise: Tensor, plan: list[list[bool]] | None = None,
                       routed: bool = True) -> Tensor:
        """Normalised chunk (B, chunk, max_action_dim): the router's route (or ``plan``), then the
        expert's Euler steps. ``routed=False`` runs every layer (the teacher's computation)."""
        if plan is None and routed:
            _, plan = self.route(prefix)
        return self.ops.sample_routed(self.model, prefix, noise, plan, self.kv_mode)


class RoutedSmolVLA(RoutedFlowStudent):
    """A SmolVLAModel plus a router over its first L - 1 VLM text layers (ops: this module's functions)."""


# ---- the functions, usable on a teacher's SmolVLAModel too -------------------------------------
def gated_prefix(model: SmolVLAModel, prefix: Prefix, masks: Tensor | None) -> tuple[PrefixCache, list[Tensor]]:
    context = prefix.context(model.head_dim)
    hidden, layers, hiddens = prefix.embeddings, [], []
    last = model.num_vlm_layers - 1
    for index in range(model.num_vlm_layers):
        output, kv = model.vlm_layer(index, hidden, context, need_output=index < last)
        layers.append(kv)
        if index < last:
            if masks is None:
                hidden = output
            else:
                hidden = hidden + masks[:, index, None, None].to(hidden.dtype) * (output - hidden)
            hiddens.append(hidden)
    cross = [model.project_cross_kv(i, kv) for i, kv in enumerate(layers)]
    return PrefixCache(layers, cross, prefix.pad_masks), hiddens


def route_layers(model, hidden: Tensor, context, plan: list[list[bool]], kv_mode: str, context_rows=_rows
                 ) -> tuple[list[LayerKV | None], list[list[bool]] | None]:
    """Every VLM layer's keys/values with routed layer i run only for the rows whose ``plan[row][i]``
    is True (any family's model with ``vlm_layer`` and ``num_vlm_layers``; ``context_rows`` takes the
    batch rows of its prefix context); and, for ``skip_expert``, which rows skip which expert layer.
    A layer that every row skips in ``skip_expert`` mode has None: nothing reads it."""
    batch, last = hidden.shape[0], model.num_vlm_layers - 1
    if len(plan) != batch or any(len(row) != last for row in plan):
        raise ValueError(f"route: expected {batch} rows of {last} layer decisions")
    device = hidden.device
    layers: list[LayerKV | None] = []
    expert_skip = [[False] * model.num_vlm_layers for _ in range(batch)] if kv_mode == KV_SKIP_EXPERT else None
    for index in range(last):
        run = [b for b in range(batch) if plan[b][index]]
        skip = [b for b in range(batch) if not plan[b][index]]
        kv_key = kv_value = None
        run_rows = None if len(run) == batch else torch.tensor(run, dtype=torch.long).to(device, non_blocking=True)
        skip_rows = None if len(skip) == batch else torch.tensor(skip, dtype=torch.long).to(device, non_blocking=True)
        new_hidden = hidden
        if run:
            part_hidden = hidden if run_rows is None else _rows(hidden, run_rows)
            part_context = context if run_rows is None else context_rows(context, run_rows)
            output, kv = model.vlm_layer(index, part_hidden, part_context)
            new_hidden = output if run_rows is None else hidden.index_copy(0, run_rows, output)
            kv_key, kv_value = _merge(None, kv.key, run_rows, batch), _merge(None, kv.value, run_rows, batch)
        if skip:
            mode = KV_PROJECT if kv_mode == KV_REUSE and index == 0 else kv_mode
            if mode == KV_PROJECT:  # from the input the skipped layer would have received
                part_hidden = hidden if skip_rows is None else _rows(hidden, skip_rows)
                part_context = context if skip_rows is None else context_rows(context, skip_rows)
                _, kv = model.vlm_layer(index, part_hidden, part_context, need_output=False)
            elif mode == KV_REUSE:  # the previous layer's (itself run, projected or reused)
                previous = layers[index - 1]
                kv = previous if skip_rows is None else _rows(previous, skip_rows)
            else:  # skip_expert: nothing to compute; these rows skip the paired expert layer (their
                # rows of a mixed batch's keys/values stay _merge's zeros: computed, then discarded)
                for b in skip:
                    expert_skip[b][index] = True
                kv = None
            if kv is not None:
                kv_key, kv_value = _merge(kv_key, kv.key, skip_rows, batch), _merge(kv_value, kv.value, skip_rows, batch)
        layers.append(None if kv_key is None else LayerKV(kv_key, kv_value))
        hidden = new_hidden
    _, kv = model.vlm_layer(last, hidden, context, need_output=False)
    layers.append(kv)
    return layers, expert_skip


def routed_prefix(model: SmolVLAModel, prefix: Prefix, plan: list[list[bool]] | None, kv_mode: str = KV_PROJECT
                  ) -> tuple[PrefixCache, list[list[bool]] | None]:
    if plan is None:
        return model.run_prefix(prefix), None
    layers, expert_skip = route_layers(model, prefix.embeddings, prefix.context(model.head_dim), plan, kv_mode)
    cross = []
    for index, kv in enumerate(layers):
        if kv is None:  # every row skips this expert layer: neither keys/values nor their projection
            cross.append(None)
            continue
        cross.append(model.project_cross_kv(index, kv))
    return PrefixCache(layers, cross, prefix.pad_masks), expert_skip


def routed_denoise_step(model: SmolVLAModel, noisy_actions: Tensor, time: Tensor, cache: PrefixCache,
                        context: SuffixContext, expert_skip: list[list[bool]] | None) -> Tensor:
    """``SmolVLAModel.denoise_step`` with expert layer i the identity for the rows in
    ``expert_skip[row][i]`` (``skip_expert`` mode); None is exactly the teacher's step. ``context``
    None is made from the cache (sampling makes it once per chunk)."""
    if expert_skip is None:
        return model.denoise_step(noisy_actions, time, cache, context)
    if context is None:
        context = model.suffix_context(cache, model.config.chunk_size)
    hidden = model.embed_suffix(noisy_actions, time)
    batch = hidden.shape[0]
    for index in range(model.num_vlm_layers):
        skipping = [b for b in range(batch) if expert_skip[b][index]]
        if len(skipping) == batch:
            continue
        output = model.expert_layer(index, hidden, cache, context)
        if skipping:  # rows whose cache entry is zeros: computed, then discarded
            keep = torch.tensor([not expert_skip[b][index] for b in range(batch)], device=hidden.device)
            output = torch.where(keep[:, None, None], output, hidden)
        hidden = output
    hidden = model.expert.norm(hidden)[:, -model.config.chunk_size:]
    return model.action_out_proj(hidden.to(torch.float32))


def sample_routed(model: SmolVLAModel, prefix: Prefix, noise: Tensor, plan: list[list[bool]] | None,
                  kv_mode: str = KV_PROJECT) -> Tensor:
    cache, expert_skip = routed_prefix(model, prefix, plan, kv_mode)
    return integrate(model, cache, noise, expert_skip)


def integrate(model: SmolVLAModel, cache: PrefixCache, noise: Tensor, expert_skip: list[list[bool]] | None) -> Tensor:
    """The expert's Euler steps from the start noise over a (routed) prefix cache (SmolVLAModel.sample_actions')."""
    batch, steps = noise.shape[0], model.config.num_steps
    dt = -1.0 / steps
    context = model.suffix_context(cache, model.config.chunk_size)
    x_t = noise
    for step in range(steps):
        time = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=noise.device).expand(batch)
        x_t = x_t + dt * routed_denoise_step(model, x_t, time, cache, context, expert_skip)
    return x_t


def evenly_spaced_plan(num_layers: int, kept: int) -> list[bool]:
    """``kept`` of ``num_layers`` routed layers spread over depth, always including the last."""
    if not 1 <= kept <= num_layers:
        raise ValueError(f"kept layers must be in 1..{num_layers}, got {kept}")
    chosen = set(torch.linspace(num_layers - 1, 0, kept).round().long().tolist()) if kept > 1 else {num_layers - 1}
    return [layer in chosen for layer in range(num_layers)]


STATIC_LAYERS = ("first", "even")


def static_plan(kind: str, num_layers: int, kept: int) -> list[bool]:
    """A static student's route: the first ``kept`` routed layers, or ``kept`` evenly spaced ones."""
    if kind not in STATIC_LAYERS:
        raise ValueError(f"static layers must be one of {list(STATIC_LAYERS)}, got {kind!r}")
    if kind == "first":
        return [layer < kept for layer in range(num_layers)]
    return evenly_spaced_plan(num_layers, kept)


# ---- compute, counted as executed --------------------------------------------------------------
def chunk_flops(model: SmolVLAModel, prefix: Prefix, images: list[Tensor], plan: list[bool] | None,
                kv_mode: str = KV_PROJECT) -> dict[str, float]:
    """FLOPs of one chunk for ONE observation (``prefix`` and ``images`` of batch 1), counted by
    torch's FlopCounterMode on what actually runs (matrix products and convolutions; norms,
    softmax and element-wise ops are not counted): the vision tower + connector per camera, the
    VLM prefix once (with the route ``plan``, None for every layer), and every denoising step of
    the expert over the cached prefix."""
    from torch.utils.flop_counter import FlopCounterMode

    if prefix.embeddings.shape[0] != 1:
        raise ValueError("chunk_flops counts one observation: pass a prefix of batch 1")

    def counted(fn) -> tuple[float, object]:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            result = fn()
        return float(counter.get_total_flops()), result

    vision = [counted(lambda image=image: model.embed_image(image))[0] for image in images]
    prefix_flops, (cache, expert_skip) = counted(
        lambda: routed_prefix(model, prefix, None if plan is None else [plan], kv_mode))
    context = model.suffix_context(cache, model.config.chunk_size)
    noise = torch.zeros(1, model.config.chunk_size, model.config.max_action_dim, device=prefix.embeddings.device)
    time = torch.ones(1, device=noise.device)
    step_flops, _ = counted(lambda: routed_denoise_step(model, noise, time, cache, context, expert_skip))
    steps = model.config.num_steps
    return {"vision_per_camera": vision, "vision": sum(vision), "prefix": prefix_flops,
            "expert_per_step": step_flops, "steps": steps, "expert": step_flops * steps,
            "total": sum(vision) + prefix_flops + step_flops * steps}


class RouteCosts:
    """FLOPs of each piece of one chunk, counted once (FlopCounterMode, one observation), so that
    the cost of any route under any ``kv_mode`` is a sum: the vision tower per camera; per VLM layer
    its full run, its keys/values alone and (cross-attention expert layers) the expert's projection
    of them; per denoising step the suffix embedding and output head plus each expert layer.
    ``total(plan, mode)`` equals :func:`chunk_flops` (tested) and works on a model built on the
    meta device, e.g. at SmolVLA's published size, without running it."""

    def __init__(self, model: SmolVLAModel, prefix: Prefix, images: list[Tensor]):
        from torch.utils.flop_counter import FlopCounterMode

        def counted(fn) -> float:
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                fn()
            return float(counter.get_total_flops())

        self.num_vlm_layers, self.steps = model.num_vlm_layers, model.config.num_steps
        self.vision = [counted(lambda image=image: model.embed_image(image)) for image in images]
        with torch.no_grad():
            context = prefix.context(model.head_dim)
            cache = model.run_prefix(prefix)
        hidden = prefix.embeddings
        self.full = [counted(lambda i=i: model.vlm_layer(i, hidden, context)) for i in range(self.num_vlm_layers)]
        self.kv = [counted(lambda i=i: model.vlm_layer(i, hidden, context, need_output=False))
                   for i in range(self.num_vlm_layers)]
        self.cross = [counted(lambda i=i: model.project_cross_kv(i, cache.layers[i])) for i in range(self.num_vlm_layers)]
        suffix_context = model.suffix_context(cache, model.config.chunk_size)
        noise = torch.zeros(1, model.config.chunk_size, model.config.max_action_dim, device=hidden.device)
        time = torch.ones(1, device=hidden.device)
        with torch.no_grad():
            suffix = model.embed_suffix(noise, time)
        self.expert = [counted(lambda i=i: model.expert_layer(i, suffix, cache, suffix_context))
                       for i in range(self.num_vlm_layers)]
        self.step_base = counted(lambda: model.denoise_step(noise, time, cache, suffix_context)) - sum(self.expert)

    def total(self, plan: list[bool] | None, kv_mode: str = KV_PROJECT) -> dict[str, float]:
        last = self.num_vlm_layers - 1
        plan = [True] * last if plan is None else list(plan)
        prefix, expert_layers = self.kv[last] + self.cross[last], self.expert[last]
        for index, runs in enumerate(plan):
            skipped_expert = not runs and kv_mode == KV_SKIP_EXPERT
            if runs:
                prefix += self.full[index]
            elif kv_mode == KV_PROJECT or (kv_mode == KV_REUSE and index == 0):
                prefix += self.kv[index]
            if not skipped_expert:
                prefix += self.cross[index]
                expert_layers += self.expert[index]
        step = self.step_base + expert_layers
        vision = sum(self.vision)
        return {"vision_per_camera": list(self.vision), "vision": vision, "prefix": prefix, "expert_per_step": step,
                "steps": self.steps, "expert": step * self.steps, "total": vision + prefix + step * self.steps}


# ---- a student directory, loaded -------------------------------------------------------------
def read_student_card(path: Path, family: str = "smolvla") -> dict:
    """card.json of a student of ``family``; one line naming the file when it is not one."""
    from actdistill_ros.policies.flow_family import family_named

    label = family_named(family).label
    try:
        card = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ProcessorError(f"{path}: not a readable JSON card ({err})") from None
    if not isinstance(card, dict) or card.get("family") != family or card.get("kind") != "student":
        raise ProcessorError(f"{path}: not a {label} student card (expected family \"{family}\", kind \"student\")")
    if card.get("format") != CARD_FORMAT:
        raise ProcessorError(f"{path}: card format {card.get('format')!r} is not supported (expected {CARD_FORMAT})")
    routing = (card.get("vla_config") or {}).get("routing") or {}
    if routing.get("kv_mode") not in KV_MODES or not isinstance(routing.get("routed_layers"), int):
        raise ProcessorError(f"{path}: vla_config.routing needs kv_mode (one of {list(KV_MODES)}) and routed_layers")
    for name in ("default_keep_fraction", "default_threshold"):
        value = card.get(name)
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ProcessorError(f"{path}: {name} must be a number in [0, 1], got {value!r}")
    if not isinstance(card.get("router_config"), dict):
        raise ProcessorError(f"{path}: router_config missing")
    return card


def student_family(path: str | Path):
    """The FlowFamily of a student directory written by ``actdistill distill`` (a LeRobot config.json
    of the family and a card.json of that family, kind student), else None."""
    from actdistill_ros.policies.flow_family import family_of_dir

    family = family_of_dir(path)
    try:
        data = json.loads((Path(path) / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = family is not None and isinstance(data, dict) and data.get("family") == family.name \
        and data.get("kind") == "student"
    return family if ok else None


def is_smolvla_student_dir(path: str | Path) -> bool:
    """A directory with a LeRobot SmolVLA config.json and a card.json of family smolvla, kind student."""
    family = student_family(path)
    return family is not None and family.name == "smolvla"


# ---- the routed policy ---------------------------------------------------------------------------
class RoutedPolicyMixin:
    """A student: the family's LeRobot pre/post-processing (the policy class it is mixed into)
    around a :class:`RoutedFlowStudent`. ``keep_fraction`` (> 0: keep routing) and ``threshold``
    are the run-time dial."""

    def __init__(self, routed: RoutedFlowStudent, base, card: dict | None = None):
        super().__init__(routed.model, base.config, base.preprocessor, base.postprocessor, base.tokenizer,
                         base.directory)
        self.routed = routed.eval()
        self.card = card

    @property
    def keep_fraction(self) -> float:
        return self.routed.keep_fraction

    @keep_fraction.setter
    def keep_fraction(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1] (0 = threshold routing), got {value!r}")
        self.routed.keep_fraction = float(value)

    @property
    def threshold(self) -> float:
        return self.routed.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {value!r}")
        self.routed.threshold = float(value)

    def to(self, device):
        self.routed.to(device)
        return self

    @torch.inference_mode()
    def route(self, batch: dict[str, Tensor], tasks) -> tuple[Tensor, list[list[bool]]]:
        prefix, _ = self.preprocess(batch, tasks)
        return self.routed.route(prefix)

    @torch.inference_mode()
    def predict_action_chunk(self, batch: dict[str, Tensor], tasks, noise: Tensor | None = None) -> Tensor:
        prefix, size = self.preprocess(batch, tasks)
        noise = self.start_noise(size) if noise is None else self.check_noise(noise, size)
        actions = self.routed.sample_actions(prefix, noise)[:, :, :self.config.action_dim]
        return unnormalize_actions(self.postprocessor, actions).float().cpu()


class RoutedSmolVLAPolicy(RoutedPolicyMixin, SmolVLAPolicy):
    """A SmolVLA student: LeRobot's pre/post-processing around a :class:`RoutedSmolVLA`."""


def load_student(directory: str | Path, vlm_processor: str | Path | None = None, device="cpu",
                 float32: bool = False):
    """A student directory written by ``actdistill distill`` (any flow-matching family), with routing
    at its card's default. The VLM's tokenizer (and SmolVLA's VLM config) come from its own
    vlm_processor/ unless ``vlm_processor`` is given."""
    from actdistill_ros.policies.flow_family import family_of_dir

    directory = Path(directory)
    family = family_of_dir(directory)
    if family is None:
        raise ProcessorError(f"{directory / CONFIG_FILE}: not a LeRobot SmolVLA, pi0 or pi0.5 config.json")
    hooks = family.hooks()
    card = read_student_card(directory / CARD_FILE, family.name)
    routing = card["vla_config"]["routing"]
    own = directory / VLM_PROCESSOR_DIR
    base = hooks.policy.load(directory, vlm_processor if vlm_processor is not None else (own if own.is_dir() else None),
                             device="cpu", float32=float32)
    try:
        router_config = RouterConfig.from_dict(card["router_config"])
    except (TypeError, ValueError) as err:
        raise ProcessorError(f"{directory / CARD_FILE}: router_config: {err}") from None
    routed = hooks.routed(base.model, router_config, routing["kv_mode"])
    if routed.num_routed_layers != routing["routed_layers"]:
        raise ProcessorError(f"{directory / CARD_FILE}: vla_config.routing.routed_layers is {routing['routed_layers']}, "
                             f"the model routes {routed.num_routed_layers} VLM layers")
    router_path = directory / ROUTER_FILE
    try:
        routed.router.load_state_dict(load_file(str(router_path)))
    except FileNotFoundError:
        raise ProcessorError(f"{router_path}: missing (a {family.label} student's router weights)") from None
    except RuntimeError as err:
        raise ProcessorError(f"{router_path}: does not match the card's router_config "
                             f"({str(err).splitlines()[0]})") from None
    routed.keep_fraction, routed.threshold = float(card["default_keep_fraction"]), float(card["default_threshold"])
    static = routing.get("static_layers")
    if static is not None:
        layers = routed.num_routed_layers
        if (not isinstance(static, list) or not static
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in static)):
            raise ProcessorError(f"{directory / CARD_FILE}: vla_config.routing.static_layers must list routed layer "
                                 f"indices in 0..{layers - 1}, got {static!r}")
        routed.static_plan = [layer in static for layer in range(layers)]
    return hooks.routed_policy(routed.to(device), base, card)


def load_smolvla_student(directory: str | Path, vlm_processor: str | Path | None = None, device="cpu",
                         float32: bool = False) -> RoutedSmolVLAPolicy:
    """A SmolVLA student directory (``load_student`` checks the family from its files)."""
    if not is_smolvla_student_dir(directory) and student_family(directory) is not None:
        raise ProcessorError(f"{directory}: not a SmolVLA student (a {student_family(directory).label} one)")
    return load_student(directory, vlm_processor, device, float32)


# ---- the family's hooks (flow_family.FamilyHooks) ----------------------------------------------
RoutedSmolVLA.ops = SimpleNamespace(gated_prefix=gated_prefix, routed_prefix=routed_prefix,
                                    routed_denoise_step=routed_denoise_step, sample_routed=sample_routed,
                                    integrate=integrate)


def _lazy(module: str, name: str):
    """A function of a module imported only when called (the training and bench code stay out of
    what serving imports)."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    return call


def _smolvla_image_size(config) -> int:
    resize = config.resize_imgs_with_padding
    cameras = [k for k in config.image_features if not k.startswith(IMAGE_PREFIX + "empty_camera_")]
    return int(max(resize) if resize else max(max(config.image_features[k].shape[1:]) for k in cameras))


def _smolvla_bench(model, keep_fractions, iters, warmup, device):
    from actdistill_ros.policies.smolvla.compute_smolvla import bench_keep_fractions
    return bench_keep_fractions(model, keep_fractions, iters=iters, warmup=warmup, device=device)


def _smolvla_vlm_dir(policy, vlm_processor):
    from actdistill_ros.policies.smolvla.processor_smolvla import resolve_vlm_dir
    return resolve_vlm_dir(policy.config.vlm_model_name, vlm_processor)


_DISTILL = "actdistill_ros.policies.smolvla.distill_smolvla"
HOOKS = FamilyHooks(policy=SmolVLAPolicy, routed=RoutedSmolVLA, routed_policy=RoutedSmolVLAPolicy,
                    gated_prefix=gated_prefix, freeze_prefix_embedding=_lazy(_DISTILL, "freeze_prefix_embedding"),
                    lerobot_state=_lazy(_DISTILL, "lerobot_state"), vlm_dir=_smolvla_vlm_dir,
                    image_size=_smolvla_image_size, route_costs=RouteCosts, bench_keep_fractions=_smolvla_bench)
