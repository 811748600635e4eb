"""`actdistill make-backbone`: a small image-text-to-text model of a supported family, built from
scratch (random init, the real transformers classes) with a locally built tokenizer, saved with
``save_pretrained`` so that ``train-teacher --backbone DIR`` loads it exactly as it would a
downloaded model (offline). For CPU runs, tests and benchmarks; nothing is downloaded.

The tokenizer is a word-level vocabulary (lower-cased words, punctuation, single digits) over the
Meta-World and toy-task instruction words, robot-manipulation words and common English, so that
commands tokenize into real words rather than hashed buckets.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

FAMILIES = ("paligemma", "idefics3", "qwen2_5_vl")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>", "<video>", "<vision_start>", "<vision_end>")

# Instruction words of the Meta-World MT10 tasks and of the generated toy task, then words a robot
# command plausibly uses, then common English.
VOCABULARY_WORDS = """
reach goal with gripper push puck pick up and place it at open door drawer close press button from top
insert peg into hole side slide window closed move left right down
robot arm hand finger fingers grasp grab release drop hold lift lower raise put take bring fetch carry hand
over give stack unstack pour wipe clean sweep fold unfold turn rotate twist flip spin tilt pull shove nudge
tap touch point poke insert remove plug unplug screw unscrew tighten loosen hang stir scoop open shut lock
unlock switch toggle knob handle lever lid cap cover box bin basket tray plate bowl cup mug glass bottle
jar can pan pot kettle spoon fork knife block cube ball cylinder cone ring rod stick tool toy object item
thing piece part table shelf counter sink stove oven microwave fridge cabinet cupboard faucet tap
towel cloth sponge paper bag book pen marker phone remote key keys lamp light target marker region area
zone corner edge center centre middle front back behind beside between near far next inside outside onto
above below under beneath around across along through toward towards away forward backward backwards
upward downward sideways up down high low higher lower top bottom
red green blue yellow orange purple pink black white gray grey brown dark bright small big large tiny
little long short tall wide narrow thin thick heavy light soft hard round square flat empty full
first second third last one two three four five six seven eight nine ten half quarter all each every
both either other another same different more less most least few many much some any no none only
slowly quickly fast slow carefully gently gentle firmly again once twice then now next before after
until while when where what which who whose why how please stop wait start begin finish done go come
keep let make do does did done get got set see look find show try use need want like go
the a an this that these those there here it its they them their we us our you your he she him her
his hers i me my mine is are was were be been being am have has had not yes or but so if as of for
on in to by at from off out about into over under again than too very also just even still
can could will would should must may might shall
position pose joint joints angle gripper end effector base camera wrist scene view image
cm mm m meter meters metre metres centimeter centimeters millimeter millimeters inch inches degree degrees
second seconds step steps times
""".split()
PUNCTUATION = list(",.!?;:'\"-()/")
DIGITS = list("0123456789")


def build_tokenizer(extra_special_tokens: dict[str, str] | None = None):
    """A word-level PreTrainedTokenizerFast with pad/unk/bos/eos/image tokens (BOS prepended), plus
    ``extra_special_tokens`` (attribute name -> token, e.g. SmolVLM's processor tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    extra = dict(extra_special_tokens or {})
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *extra.values()])) + list(dict.fromkeys(VOCABULARY_WORDS))
    tokens += PUNCTUATION + DIGITS
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                       pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>",
                                   extra_special_tokens={"image_token": "<image>", **extra})


# Sizes: "tiny" (~0.5M parameters: tests), "cpu" (~25M: CPU benchmarks, like the reference VLA's
# bench preset). head_dim is set apart from width / heads on purpose where the family allows it.
SIZES = {
    "tiny": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=2),
             "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
             "image_size": 64, "patch_size": 16, "head_dim": 32},
    "cpu": {"text": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                         num_key_value_heads=2),
            "vision": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3),
            "image_size": 96, "patch_size": 16, "head_dim": 64},
    # The Meta-World benchmark model (docs/BENCHMARKS.md): the reference teacher's depth and width,
    # 64 px input, so that it trains on 2 CPU cores in the same time.
    "metaworld": {"text": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
                               num_key_value_heads=2),
                  "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
                  "image_size": 64, "patch_size": 16, "head_dim": 48},
}


def backbone_config(family: str, size: str, tokenizer):
    """The transformers config of a small model of ``family``, its vocabulary that of ``tokenizer``."""
    from transformers import Idefics3Config, PaliGemmaConfig, Qwen2_5_VLConfig

    if family not in FAMILIES:
        raise ValueError(f"--family {family!r}: expected one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    preset = SIZES[size]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    token_ids = dict(vocab_size=len(tokenizer), pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                     eos_token_id=ids["<eos>"])
    text = {**preset["text"], **token_ids}
    vision = dict(preset["vision"], image_size=preset["image_size"], patch_size=preset["patch_size"])
    if family == "paligemma":
        width = text["hidden_size"]
        return PaliGemmaConfig(
            text_config=dict(model_type="gemma", head_dim=preset["head_dim"], **text),
            vision_config=dict(model_type="siglip_vision_model", projection_dim=width, **vision),
            image_token_index=ids["<image>"], projection_dim=width, **token_ids)
    if family == "idefics3":
        return Idefics3Config(text_config=dict(model_type="llama", head_dim=preset["head_dim"], **text),
                              vision_config=vision, scale_factor=2, image_token_id=ids["<image>"], **token_ids)
    # Qwen2.5-VL: its own patch/merge geometry (14 x 2) and an mrope split of head_dim / 2.
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    qwen_vision = {"hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
                   "depth": vision["num_hidden_layers"], "num_heads": vision["num_attention_heads"],
                   "patch_size": 14, "spatial_merge_size": 2, "out_hidden_size": text["hidden_size"],
                   "fullatt_block_indexes": [vision["num_hidden_layers"] - 1], "window_size": 56}
    return Qwen2_5_VLConfig(text_config=dict(rope_scaling={"type": "mrope", "mrope_section": sections}, **text),
                            vision_config=qwen_vision, image_token_id=ids["<image>"], video_token_id=ids["<video>"],
                            vision_start_token_id=ids["<vision_start>"], vision_end_token_id=ids["<vision_end>"],
                            **token_ids)


def make_backbone(family: str, out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build, randomly initialise and save a ``family`` model and its tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForImageTextToText

    tokenizer = build_tokenizer()
    config = backbone_config(family, size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    count = sum(p.numel() for p in model.parameters())
    log.info("%s (%s, %.2fM parameters, random init) written to %s", family, size, count / 1e6, out_dir)
    return out_dir


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("make-backbone", help="build a small from-scratch VLM backbone (for CPU runs and tests)")
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", type=Path, required=True, help="directory for the model and tokenizer")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    make_backbone(args.family, args.out, args.size, args.seed)
    return 0
