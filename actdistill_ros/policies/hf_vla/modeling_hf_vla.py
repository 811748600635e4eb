"""A VLA teacher around a Hugging Face image-text-to-text model (PaliGemma, Idefics3/SmolVLM,
Qwen2.5-VL, and other models with the usual layout).

Token layout (fixed, so positions and rotary embeddings are computed once):

    [camera 1 image tokens] ... [camera C image tokens] [instruction, padded] [state] [H action queries]

- image tokens: the model's own vision tower + projector, one block per camera;
- instruction tokens: the model's own tokenizer and embedding, padded to ``max_text_tokens``;
- state token: a linear projection of the normalised robot state;
- action queries: H learned tokens; a head reads each one's final hidden state as one step of the
  action chunk (parallel decoding, as OpenVLA-OFT does).

The routed backbone is the language model's decoder stack. ``run_layer(i)`` calls decoder layer
``i`` exactly as the parent model's forward does: the same rotary ``position_embeddings`` (computed
by the parent's own ``rotary_emb``, 3-axis multimodal positions for Qwen), and a 4-D mask in the
form the attention implementation expects. A test checks that running every layer equals the
parent language model's own forward.

Attention is prefix-LM (as pi0 does on PaliGemma): the image + instruction prefix attends within
itself with the backbone's pretraining pattern (bidirectional for PaliGemma, causal for causal
decoders), so a pretrained VLM sees its prefix as it was trained to; the state and action-query
tokens attend to every valid token, and to each other bidirectionally, so the H queries are decoded
in parallel and each sees the whole observation; the prefix never attends to them, so adding the
untrained state/query tokens does not perturb the pretrained prefix features. Padding keys are
masked out everywhere.
"""

from __future__ import annotations

import inspect
import json
import logging
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from actdistill_ros.policies.hf_vla.configuration_hf_vla import HFVLAConfig
from actdistill_ros.policies.common import NormalizationMixin, camera_batch, full_depth_forward
from actdistill_ros.policies.observation import (ACTION_QUERY, LANGUAGE, STATE, VISUAL, EncodedObservation,
                                                segment_spans)

log = logging.getLogger(__name__)

BACKBONE_DIR = "backbone"  # inside a weights directory: the HF config and tokenizer files
HALF = [0.5, 0.5, 0.5]  # SigLIP / Idefics3 normalisation
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # Qwen-VL normalisation (OpenAI CLIP)
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class UnsupportedBackbone(ValueError):
    """A model this family cannot route; the message is one line naming its model_type."""


# ---- how each family's parts are reached ---------------------------------------------------------
class BackboneAdapter:
    """The usual layout, found by attribute discovery: ``get_image_features`` (vision tower +
    projector), ``get_input_embeddings``, and a decoder (``get_decoder()``) with ``layers``,
    ``rotary_emb`` and ``norm``. Stateless: every method takes the base model."""

    name = "generic"
    model_types: tuple[str, ...] = ()
    prefix_attention = "causal"
    image_mean, image_std = HALF, HALF
    vision_attributes = ("vision_tower", "vision_model", "visual")

    def language_model(self, backbone: nn.Module) -> nn.Module:
        return backbone.get_decoder() if hasattr(backbone, "get_decoder") else None

    def vision_tower(self, backbone: nn.Module) -> nn.Module | None:
        return next((getattr(backbone, a) for a in self.vision_attributes if hasattr(backbone, a)), None)

    def missing(self, backbone: nn.Module) -> str | None:
        """What this backbone lacks for this adapter, or None."""
        if self.vision_tower(backbone) is None:
            return f"no vision tower (looked for {', '.join(self.vision_attributes)})"
        if not hasattr(backbone, "get_image_features"):
            return "no get_image_features() to turn pixels into image tokens"
        return None

    def default_image_size(self, backbone: nn.Module) -> int | None:
        """The vision tower's fixed input size; None when it takes any multiple of check_image_size's unit."""
        size = getattr(getattr(backbone.config, "vision_config", None), "image_size", None)
        return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None

    def check_image_size(self, backbone: nn.Module, size: int) -> None:
        fixed = self.default_image_size(backbone)
        if fixed is not None and size != fixed:
            raise ValueError(f"HFVLAConfig.image_size is {size}, the {backbone.config.model_type} vision tower "
                             f"takes {fixed}x{fixed} images")

    def image_features(self, backbone: nn.Module, pixels: Tensor) -> Tensor:
        """Normalised pixels (n, 3, S, S) -> image tokens (n, T, width)."""
        return _as_token_blocks(backbone.get_image_features(pixel_values=pixels), len(pixels))

    def position_ids(self, backbone: nn.Module, num_tokens: int, image_blocks: list[tuple[int, int]],
                     image_size: int) -> Tensor:
        """Positions of the fixed layout as the parent's forward computes them (1, N)."""
        return torch.arange(num_tokens)[None]

    def layer_position_ids(self, positions: Tensor) -> Tensor | None:
        """What the parent's forward passes to each decoder layer as ``position_ids``."""
        return positions


class PaliGemmaAdapter(BackboneAdapter):
    name, model_types = "paligemma", ("paligemma",)
    prefix_attention = "bidirectional"  # PaliGemma's own prefix-LM pretraining

    def language_model(self, backbone):
        return backbone.language_model

    def vision_tower(self, backbone):
        return backbone.vision_tower

    def position_ids(self, backbone, num_tokens, image_blocks, image_size):
        return torch.arange(num_tokens)[None] + 1  # PaliGemma positions are 1-indexed


class Idefics3Adapter(BackboneAdapter):
    """Idefics3 and SmolVLM (SmolVLA's backbone): SigLIP + pixel-shuffle connector + Llama text model.

    One global image per camera (no image splitting into tiles)."""

    name, model_types = "idefics3", ("idefics3", "smolvlm")

    def language_model(self, backbone):
        return backbone.text_model

    def vision_tower(self, backbone):
        return backbone.vision_model

    def image_features(self, backbone, pixels):
        # The vision model and connector directly: get_image_features drops all-zero images as padding.
        hidden = backbone.vision_model(pixel_values=pixels.to(backbone.vision_model.dtype)).last_hidden_state
        return backbone.connector(hidden)


class QwenVLAdapter(BackboneAdapter):
    """Qwen2-VL and Qwen2.5-VL: the vision tower takes flattened patches plus (t, h, w) grids, and
    the decoder uses 3-axis multimodal rotary positions (mrope)."""

    name, model_types = "qwen2_5_vl", ("qwen2_5_vl", "qwen2_vl")
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    def language_model(self, backbone):
        return backbone.language_model

    def vision_tower(self, backbone):
        return backbone.visual

    def default_image_size(self, backbone):
        return None  # any multiple of patch_size * spatial_merge_size

    def _unit(self, backbone) -> int:
        vision = backbone.config.vision_config
        return vision.patch_size * vision.spatial_merge_size

    def check_image_size(self, backbone, size):
        if size % self._unit(backbone):
            raise ValueError(f"HFVLAConfig.image_size is {size}, the {backbone.config.model_type} vision tower takes "
                             f"multiples of {self._unit(backbone)} (patch_size x spatial_merge_size)")

    def _grid(self, backbone, size: int, count: int, device) -> Tensor:
        side = size // backbone.config.vision_config.patch_size
        return torch.tensor([[1, side, side]] * count, device=device)

    def image_features(self, backbone, pixels):
        """Patchify as Qwen2VLImageProcessor does (a still image repeated over the temporal patch)."""
        vision = backbone.config.vision_config
        n, channels, size, _ = pixels.shape
        p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        side = size // p
        patches = pixels.reshape(n, channels, side // m, m, p, side // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        patches = patches.unsqueeze(6).expand(n, side // m, side // m, m, m, channels, t, p, p)
        flat = patches.reshape(n * side * side, channels * t * p * p)
        grid = self._grid(backbone, size, n, pixels.device)
        output = backbone.get_image_features(pixel_values=flat, image_grid_thw=grid)
        return _as_token_blocks(output, n)

    def position_ids(self, backbone, num_tokens, image_blocks, image_size):
        """(3, 1, N): every camera block gets (t, h, w) grid positions from the model's own
        get_vision_position_ids, text-like tokens advance all three axes by one (get_rope_index)."""
        merge = backbone.config.vision_config.spatial_merge_size
        grid = self._grid(backbone, image_size, 1, "cpu")[0]
        parts, current, cursor = [], 0, 0
        for start, length in image_blocks:
            if start > cursor:  # text-like tokens before this image
                parts.append(torch.arange(start - cursor).expand(3, -1) + current)
                current += start - cursor
            block = backbone.get_vision_position_ids(current, grid, 1, merge, 1.0, device="cpu")
            if block.shape[1] != length:
                raise ValueError(f"qwen image block of {length} tokens, its grid gives {block.shape[1]} positions")
            parts.append(block)
            current += int(max(grid[1], grid[2])) // merge
            cursor = start + length
        parts.append(torch.arange(num_tokens - cursor).expand(3, -1) + current)
        return torch.cat(parts, dim=1)[:, None]

    def layer_position_ids(self, positions):
        return None  # the Qwen text model passes no text position ids for 3-axis positions


ADAPTERS = (PaliGemmaAdapter(), Idefics3Adapter(), QwenVLAdapter())
GENERIC = BackboneAdapter()


def _as_token_blocks(output, count: int) -> Tensor:
    """get_image_features' return (a tensor, a list of tensors or a model output) -> (n, T, width)."""
    features = output
    if not torch.is_tensor(output) and not isinstance(output, (list, tuple)):
        features = getattr(output, "pooler_output", None)
        if features is None:
            features = output.last_hidden_state
    if isinstance(features, (list, tuple)):
        features = torch.stack([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(count, -1, features.shape[-1])


def adapter_for(backbone: nn.Module) -> BackboneAdapter:
    """The adapter of a base model; raises UnsupportedBackbone (one line) if it does not fit."""
    model_type = backbone.config.model_type
    adapter = next((a for a in ADAPTERS if model_type in a.model_types), GENERIC)
    problem = adapter.missing(backbone) or _decoder_problem(adapter.language_model(backbone))
    if problem:
        raise UnsupportedBackbone(f"{model_type}: cannot be used as an hf_vla backbone: {problem}")
    return adapter


def _decoder_problem(decoder: nn.Module | None) -> str | None:
    if decoder is None:
        return "no language model (get_decoder())"
    name = type(decoder).__name__
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList) or not len(decoder.layers):
        return f"its language model {name} has no decoder `layers` stack to route"
    for attribute in ("rotary_emb", "norm"):
        if not isinstance(getattr(decoder, attribute, None), nn.Module):
            return f"its decoder {name} has no `{attribute}` (rotary position embeddings and a final norm are expected)"
    kinds = sorted({type(layer).__name__ for layer in decoder.layers})
    if len(kinds) > 1:
        return f"its decoder mixes layer kinds {kinds} (e.g. cross-attention layers), not one routable stack"
    layer = decoder.layers[0]
    if not hasattr(layer, "self_attn"):
        return f"its decoder layer {kinds[0]} has no `self_attn`"
    if any("expert" in n for n, _ in layer.named_modules()):
        return f"its decoder layer {kinds[0]} is mixture-of-experts (per-token compute depends on expert routing)"
    return None


# ---- loading a backbone --------------------------------------------------------------------------
def _hf_kwargs(source: str | Path, trust_remote_code: bool) -> dict:
    """A local directory is read offline; anything else is a hub id (downloaded unless HF_HUB_OFFLINE=1)."""
    return {"local_files_only": Path(source).is_dir(), "trust_remote_code": trust_remote_code}


def _base_model(build):
    """``build(attn_implementation=...)`` with SDPA attention (the 4-D boolean masks of run_layer),
    else with the eager fallback."""
    try:
        return build(attn_implementation="sdpa")
    except ValueError as err:
        if "sdpa" not in str(err).lower():
            raise
        return build(attn_implementation="eager")


def _preprocessor_stats(source: str | Path, kwargs: dict) -> dict:
    """image_mean/std from the backbone's preprocessor_config.json, if it ships one."""
    from transformers.utils import cached_file

    try:
        path = cached_file(str(source), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, local_files_only=kwargs["local_files_only"])
    except OSError:
        path = None
    try:
        data = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        log.warning("%s: unreadable preprocessor_config.json; using the family's image statistics", source)
        data = {}
    return {k: list(data[k]) for k in ("image_mean", "image_std")
            if isinstance(data.get(k), (list, tuple)) and len(data[k]) == 3}


@contextmanager
def _quiet_transformers():
    """transformers' multi-line load report and per-tensor progress bar off: what matters is
    checked and logged in one line."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_backbone(source: str | Path, trust_remote_code: bool = False) -> tuple[nn.Module, object, dict]:
    """Pretrained base model (no LM head), its tokenizer and its image statistics, from a local
    directory (offline) or a hub id. Weights are read from safetensors only."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    kwargs = _hf_kwargs(source, trust_remote_code)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(source), **kwargs)
            backbone, info = _base_model(lambda **a: AutoModel.from_pretrained(
                str(source), config=config, dtype=torch.float32, use_safetensors=True, output_loading_info=True,
                **kwargs, **a))
            tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--backbone {source}: cannot load a transformers model and tokenizer ({first})") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        log.warning("--backbone %s: %d weights are not in the checkpoint and start random (%s%s)", source,
                    len(missing), ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "")
    adapter_for(backbone)  # fail early, with one line, if it cannot be routed
    return backbone, tokenizer, _preprocessor_stats(source, kwargs)


def rebuild_backbone(backbone_dir: Path, trust_remote_code: bool) -> tuple[nn.Module, object]:
    """Architecture and tokenizer from a weights directory's backbone/ (offline, weights not
    initialised: the caller loads model.safetensors into it)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.initialization import no_init_weights

    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(str(backbone_dir), **kwargs)
    with no_init_weights(), _quiet_transformers():
        backbone = _base_model(lambda **a: AutoModel.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code, **a))
    return backbone, AutoTokenizer.from_pretrained(str(backbone_dir), **kwargs)


def input_image_size(backbone: nn.Module, requested: int = 0) -> int:
    """The square input size: ``requested`` if given (checked), else the vision tower's own, else
    224 for towers that take any size (Qwen-VL: any multiple of 28)."""
    adapter = adapter_for(backbone)
    size = requested or adapter.default_image_size(backbone) or 224
    adapter.check_image_size(backbone, size)
    return size


def _fixed_layout_tokenizer(tokenizer):
    """Instructions are right-padded and right-truncated (the start of a command is kept), so the
    language tokens always sit at the same positions; a tokenizer without a pad token pads with
    its EOS (or UNK) token, which the mask hides anyway."""
    tokenizer.padding_side = tokenizer.truncation_side = "right"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UnsupportedBackbone(f"{type(tokenizer).__name__}: the tokenizer has no pad, eos or unk token to pad "
                                      f"instructions with")
        tokenizer.pad_token = fallback
    return tokenizer


# ---- the model -----------------------------------------------------------------------------------
# Rotary embeddings per (device, dtype, inference mode): outside the module so that deepcopy (a
# student derived from its teacher) and state_dict never see them.
_ROTARY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class HFVLA(NormalizationMixin, nn.Module):
    family = "hf_vla"

    def __init__(self, backbone: nn.Module, tokenizer, config: HFVLAConfig, image_stats: dict | None = None):
        super().__init__()
        self.adapter = adapter_for(backbone)
        self.backbone = backbone
        self.tokenizer = _fixed_layout_tokenizer(tokenizer)
        self.config = c = self._resolve(config, image_stats or {})
        decoder = self.language_model
        width = c.width
        self.register_normalization(c.action_dim, c.state_dim)
        self.register_buffer("image_mean", torch.tensor(c.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(c.image_std).view(1, 3, 1, 1), persistent=False)
        # New tokens start at the scale of the backbone's own text embeddings.
        with torch.no_grad():
            vocabulary = min(1024, backbone.get_input_embeddings().num_embeddings)
            scale = float(self.text_embeddings(torch.arange(vocabulary)).float().std())
        scale = scale if scale > 0 and scale == scale else 0.02  # garbage weights (rebuild) -> any value
        self.state_proj = nn.Linear(c.state_dim, width) if c.state_dim else None
        if self.state_proj is not None:
            nn.init.normal_(self.state_proj.weight, std=scale / max(1.0, c.state_dim ** 0.5))
            nn.init.zeros_(self.state_proj.bias)
        self.action_queries = nn.Parameter(torch.randn(1, c.chunk_size, width) * scale)
        self.action_head = nn.Sequential(nn.Linear(width, c.head_hidden), nn.GELU(),
                                         nn.Linear(c.head_hidden, c.action_dim))
        for layer in (self.action_head[0], self.action_head[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

        segments = ([VISUAL] * c.num_image_tokens + [LANGUAGE] * c.max_text_tokens
                    + ([STATE] if c.state_dim else []) + [ACTION_QUERY] * c.chunk_size)
        self.register_buffer("segment", torch.tensor(segments), persistent=False)
        self.segment_spans = segment_spans(segments)
        blocks = [(i * c.image_tokens_per_camera, c.image_tokens_per_camera) for i in range(c.num_cameras)]
        positions = self.adapter.position_ids(backbone, c.num_tokens, blocks, c.image_size)
        self.register_buffer("position_ids", positions, persistent=False)
        # Which layer types exist (Gemma3-style decoders alternate sliding and full attention).
        text_config = decoder.config
        self._layer_types = list(getattr(text_config, "layer_types", None) or ["full_attention"] * c.num_layers)
        self._rotary_takes_layer_type = "layer_type" in inspect.signature(decoder.rotary_emb.forward).parameters
        for layer_type in sorted(set(self._layer_types)):
            self.register_buffer(f"allowed_{layer_type}", self._allowed(layer_type, text_config), persistent=False)
        self._text_cache: dict[str, tuple[list[int], list[int]]] = {}

    # ---- construction ----------------------------------------------------------------------------
    def _resolve(self, config: HFVLAConfig, image_stats: dict) -> HFVLAConfig:
        """Fill the config's backbone-derived fields, and check the ones it already has."""
        backbone, adapter = self.backbone, self.adapter
        decoder = adapter.language_model(backbone)
        size = input_image_size(backbone, config.image_size)
        with torch.no_grad():
            probe = torch.zeros(1, 3, size, size, dtype=next(backbone.parameters()).dtype)
            tokens_per_camera = adapter.image_features(backbone, probe).shape[1]
        derived = {
            "backbone_type": backbone.config.model_type, "adapter": adapter.name,
            "width": int(decoder.config.hidden_size), "num_layers": len(decoder.layers),
            "image_tokens_per_camera": int(tokens_per_camera), "image_size": size,
        }
        for name, value in derived.items():
            given = getattr(config, name)
            if given not in (0, "") and given != value:
                raise ValueError(f"HFVLAConfig.{name} is {given!r}, the backbone has {value!r}")
        defaults = {"image_mean": image_stats.get("image_mean", adapter.image_mean),
                    "image_std": image_stats.get("image_std", adapter.image_std),
                    "prefix_attention": adapter.prefix_attention}
        defaults = {k: v for k, v in defaults.items() if not getattr(config, k)}
        return HFVLAConfig.from_dict({**config.to_dict(), **derived, **defaults})

    @classmethod
    def from_pretrained(cls, source: str | Path, config: HFVLAConfig) -> "HFVLA":
        """Fine-tuning start: a pretrained (or `make-backbone`) model plus fresh state/query/head."""
        backbone, tokenizer, stats = load_backbone(source, config.trust_remote_code)
        return cls(backbone, tokenizer, config, stats)

    @classmethod
    def from_weights_dir(cls, weights_dir: Path, config: HFVLAConfig, trust_remote_code: bool = False) -> "HFVLA":
        """The architecture a card describes, from its weights directory's backbone/ (offline)."""
        backbone_dir = Path(weights_dir) / BACKBONE_DIR
        if not (backbone_dir / "config.json").is_file():
            raise ValueError(f"{backbone_dir}: missing config.json (an hf_vla weights directory keeps the backbone's "
                             f"transformers config and tokenizer in {BACKBONE_DIR}/)")
        if config.trust_remote_code and not trust_remote_code:
            raise ValueError(f"{backbone_dir}: this model runs code shipped in its directory (trained with "
                             f"--trust-remote-code); load it with trust_remote_code=True only if you trust that code")
        backbone, tokenizer = rebuild_backbone(backbone_dir, config.trust_remote_code)
        return cls(backbone, tokenizer, config)

    def save_backbone_files(self, weights_dir: Path) -> None:
        """What rebuilds this model offline besides model.safetensors: the HF config and tokenizer,
        in the weights directory's backbone/ (apart from our own files, so no name collides)."""
        directory = Path(weights_dir) / BACKBONE_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.config.trust_remote_code:
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(self.backbone, directory, config=self.backbone.config)

    # ---- parts -----------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.adapter.language_model(self.backbone)

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def text_embeddings(self, ids: Tensor) -> Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def freeze_vision(self) -> None:
        """Freeze the vision tower (the projector/connector stays trainable)."""
        self.adapter.vision_tower(self.backbone).requires_grad_(False)
        if self.adapter.name == "qwen2_5_vl":  # Qwen's projector (merger) lives inside its vision tower
            self.backbone.visual.merger.requires_grad_(True)

    # ---- attention layout ------------------------------------------------------------------------
    def _allowed(self, layer_type: str, text_config) -> Tensor:
        """(N, N) bool, query x key: the prefix-LM pattern (module docstring), banded for sliding layers."""
        n = self.config.num_tokens
        prefix = (self.segment == VISUAL) | (self.segment == LANGUAGE)
        query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
        within_prefix = prefix[:, None] & prefix[None, :]
        if self.config.prefix_attention == "causal":
            within_prefix &= key <= query
        allowed = within_prefix | ~prefix[:, None]  # suffix tokens see every token
        window = getattr(text_config, "sliding_window", None)
        if layer_type == "sliding_attention" and window and window < n:
            allowed &= (query - key).abs() < window
        return allowed

    def layer_attention_mask(self, attn_mask: Tensor, layer_type: str = "full_attention",
                             dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, 1, 1, N) bool key mask -> the 4-D mask a decoder layer takes: bool (B, 1, N, N) for
        SDPA, additive float for eager attention."""
        allowed = getattr(self, f"allowed_{layer_type}")[None, None] & attn_mask
        if self.language_model.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def _position_embeddings(self, hidden: Tensor) -> dict:
        """Per layer type, (cos, sin) from the parent's rotary_emb: once per device/dtype."""
        key = (hidden.device, hidden.dtype, torch.is_inference_mode_enabled())
        cache = _ROTARY_CACHE.setdefault(self, {})
        if key not in cache:
            rotary, positions = self.language_model.rotary_emb, self.position_ids.to(hidden.device)
            cache[key] = {t: rotary(hidden[:1], positions, t) if self._rotary_takes_layer_type
                          else rotary(hidden[:1], positions) for t in set(self._layer_types)}
        return cache[key]

    # ---- DistillableVLA protocol -----------------------------------------------------------------
    def _tokenize(self, instructions: list[str], device) -> tuple[Tensor, Tensor]:
        """(B, max_text_tokens) ids and validity, right-padded; cached per instruction."""
        rows = []
        for text in instructions:
            row = self._text_cache.get(text)
            if row is None:
                encoded = self.tokenizer(text, padding="max_length", truncation=True,
                                         max_length=self.config.max_text_tokens)
                row = (list(encoded["input_ids"]), list(encoded["attention_mask"]))
                if len(self._text_cache) >= 4096:
                    self._text_cache.clear()
                self._text_cache[text] = row
            rows.append(row)
        # Built on the host and copied without blocking: a blocking copy would make the host wait
        # for the device (torch.tensor(..., device=cuda) is one).
        ids = torch.tensor([r[0] for r in rows]).to(device, non_blocking=True)
        return ids, torch.tensor([r[1] for r in rows], dtype=torch.bool).to(device, non_blocking=True)

    def encode(self, images: Tensor, instructions: list[str], states: Tensor | None = None) -> EncodedObservation:
        c = self.config
        images = camera_batch(images, self.config.num_cameras, self.config.image_size)
        batch, device, dtype = images.shape[0], self.action_queries.device, self.action_queries.dtype
        if len(instructions) != batch:
            raise ValueError(f"got {len(instructions)} instructions for {batch} observations")
        pixels = images.to(device).flatten(0, 1).permute(0, 3, 1, 2).to(dtype) / 255.0
        pixels = (pixels - self.image_mean) / self.image_std
        visual = self.adapter.image_features(self.backbone, pixels).to(dtype)
        visual = visual.reshape(batch, c.num_image_tokens, c.width)
        text_ids, text_valid = self._tokenize(list(instructions), device)
        parts = [visual, self.text_embeddings(text_ids).to(dtype)]
        valid = [torch.ones(batch, c.num_image_tokens, dtype=torch.bool, device=device), text_valid]
        if self.state_proj is not None:
            if states is None or tuple(states.shape) != (batch, c.state_dim):
                got = None if states is None else tuple(states.shape)
                raise ValueError(f"states must have shape ({batch}, {c.state_dim}), got {got}")
            parts.append(self.state_proj(self.normalize_states(states).to(dtype))[:, None])
            valid.append(torch.ones(batch, 1, dtype=torch.bool, device=device))
        parts.append(self.action_queries.expand(batch, -1, -1))
        valid.append(torch.ones(batch, c.chunk_size, dtype=torch.bool, device=device))
        return EncodedObservation(torch.cat(parts, 1), torch.cat(valid, 1), self.segment, self.segment_spans,
                                  frozenset({LANGUAGE}))

    def run_layer(self, index: int, hidden: Tensor, attn_mask: Tensor, readout: slice | None = None) -> Tensor:
        """Decoder layer ``index`` with the arguments the parent's forward gives it; with ``readout``,
        only those positions are returned. A transformers layer computes every position, so here a
        readout costs the full layer."""
        layer_type = self._layer_types[index]
        out = self.layers[index](hidden, attention_mask=self.layer_attention_mask(attn_mask, layer_type, hidden.dtype),
                                 position_ids=self.adapter.layer_position_ids(self.position_ids),
                                 position_embeddings=self._position_embeddings(hidden)[layer_type])
        out = out[0] if isinstance(out, tuple) else out
        return out if readout is None else out[:, readout]

    def predict_chunk(self, readout: Tensor) -> Tensor:
        """Final hidden states of the H action queries (B, H, W) -> normalised action chunk (B, H, D)."""
        return self.action_head(self.language_model.norm(readout))

    def layer_flops(self, num_tokens: int, readout_tokens: int | None = None) -> float:
        """Matmul FLOPs of one decoder layer for one sample (multiply-add = 2 FLOPs): every linear
        map of the layer as it is built (grouped-query K/V, gated MLP, any head_dim), plus the
        attention scores and weighted sum over all query heads. A readout costs the full layer here
        (see ``run_layer``), so ``readout_tokens`` does not change the count."""
        layer, n = self.layers[0], num_tokens
        linear = sum(2 * n * m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
        text_config = self.language_model.config
        heads = text_config.num_attention_heads
        head_dim = getattr(layer.self_attn, "head_dim", None) or text_config.hidden_size // heads
        return float(linear + 2 * (2 * n * n * heads * head_dim))

    # ---- plain full-depth use (teacher training) -------------------------------------------------
    def forward(self, images: Tensor, instructions: list[str], states: Tensor | None = None) -> Tensor:
        return full_depth_forward(self, images, instructions, states)
