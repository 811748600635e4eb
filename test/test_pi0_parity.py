"""LeRobot pi0 and pi0.5 policies run without lerobot: `actdistill predict` reproduces the actions
LeRobot 0.4.4 itself computed (with openpi's patched transformers 4.53.2) on tiny policies it made
(test/fixtures/lerobot/pi0, written by scripts/make_lerobot_fixtures.sh), and bad inputs fail with
one line naming them.

Each case holds LeRobot's saved policy directory (config.json still names the published Gemma
variants; the sizes are the tensors'), a raw batch (two cameras of different sizes and aspect
ratios), the start noise and LeRobot's ``postprocessor(policy.predict_action_chunk(preprocessor(
batch), noise=noise))``. lerobot is not installed here; everything is read offline.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actdistill_ros.cli import main as cli
from smolvla_teacher import assert_actions_match_lerobot
from actdistill_ros.policies.pi0 import PI0ConfigError, PI0Policy

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot" / "pi0"
TOKENIZER = FIXTURES / "paligemma_tokenizer"
TOKENIZER_NAME = "google/paligemma-3b-pt-224"  # what LeRobot's pi0/pi0.5 tokenizer steps save
CASES = ("pi0", "pi05")
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def case_task(case: str) -> str:
    return json.loads((FIXTURES / case / "case.json").read_text())["task"]


def load(case: str, **kwargs) -> PI0Policy:
    return PI0Policy.load(FIXTURES / case / "policy", vlm_processor=TOKENIZER, **kwargs)


def inputs(case: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    directory = FIXTURES / case
    return (load_file(str(directory / "batch.safetensors")), load_file(str(directory / "noise.safetensors"))["noise"],
            load_file(str(directory / "expected.safetensors"))["action"])


def test_fixtures_cover_the_cases():
    assert sorted(p.parent.name for p in FIXTURES.glob("*/case.json")) == sorted(CASES)
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 5e6
    for case in CASES:  # the published variant names, tiny sizes: the loader reads the shapes
        config = json.loads((FIXTURES / case / "policy" / "config.json").read_text())
        assert (config["type"], config["paligemma_variant"], config["action_expert_variant"]) == (
            case, "gemma_2b", "gemma_300m")


@pytest.mark.parametrize("case", CASES)
def test_predict_matches_lerobot(case, tmp_path, capsys):
    out = tmp_path / "action.safetensors"
    code = cli(["predict", "--policy", str(FIXTURES / case / "policy"), "--batch",
                str(FIXTURES / case / "batch.safetensors"), "--task", case_task(case), "--noise",
                str(FIXTURES / case / "noise.safetensors"), "--vlm-processor", str(TOKENIZER), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert_actions_match_lerobot(case, out, FIXTURES / case / "expected.safetensors", TOLERANCE)


@pytest.mark.parametrize("case", CASES)
def test_prompt_tokens_match_lerobot(case):
    """pi0: the task plus "\\n"; pi0.5: "Task: ..., State: <256-bin state>;\\nAction: " of the
    normalised state, tokenized and padded as LeRobot did."""
    policy = load(case)
    batch, _, _ = inputs(case)
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    from actdistill_ros.policies.pi0.processor_pi0 import run_preprocessor

    size = expected["lang_tokens"].shape[0]
    _, tokens, mask = run_preprocessor(policy.preprocessor, dict(batch), [case_task(case)] * size, policy.tokenize)
    assert torch.equal(tokens, expected["lang_tokens"]) and torch.equal(mask, expected["lang_mask"])


def test_pi05_state_is_read_through_the_prompt_only():
    """pi0.5 has no state projection: another state changes the prompt, hence the actions."""
    policy = load("pi05")
    batch, noise, expected = inputs("pi05")
    assert not hasattr(policy.model, "state_proj")
    moved = {**batch, "observation.state": batch["observation.state"] + 0.5}
    assert (policy.predict_action_chunk(moved, case_task("pi05"), noise) - expected).abs().max() > 1e-2


def test_single_observation_gains_a_batch_axis():
    """LeRobot's to_batch_processor: [3, H, W] images and an [S] state are one observation."""
    policy = load("pi05")
    batch, noise, expected = inputs("pi05")
    single = {key: value[1] for key, value in batch.items()}
    actions = policy.predict_action_chunk(single, case_task("pi05"), noise[1:2])
    assert actions.shape == expected[1:2].shape and (actions - expected[1:2]).abs().max() < TOLERANCE


def test_skipped_vlm_layer_still_gives_its_keys_values():
    """The per-layer path a router uses: run_prefix is vlm_layer in order; a skipped layer passes
    its input on and hands the expert the keys/values of that input."""
    policy = load("pi0")
    batch, noise, expected = inputs("pi0")
    model = policy.model
    with torch.inference_mode():
        prefix, _ = policy.preprocess(batch, case_task("pi0"))
        full = model.run_prefix(prefix)
        skipped = model.run_prefix(prefix, skip=frozenset({1}))
        assert torch.equal(full.layers[1].key, skipped.layers[1].key)  # layer 1 sees the same input
        assert not torch.allclose(full.layers[2].key, skipped.layers[2].key)  # layer 2 does not
        context = prefix.context(model.sizes.vlm.head_dim)
        _, layer2 = model.vlm_layer(2, model.vlm_layer(0, prefix.embeddings, context)[0], context)
        assert torch.equal(layer2.key, skipped.layers[2].key)
        unrouted = model.sample_actions(prefix, noise.clone(), cache=full)[:, :, :policy.config.action_dim]
        routed = model.sample_actions(prefix, noise.clone(), cache=skipped)[:, :, :policy.config.action_dim]
    from actdistill_ros.policies.lerobot_processor import unnormalize_actions

    assert (unnormalize_actions(policy.postprocessor, unrouted) - expected).abs().max() < TOLERANCE
    assert (unnormalize_actions(policy.postprocessor, routed) - expected).abs().max() > 1e-3


def test_tokenizer_from_the_hf_cache_offline(tmp_path):
    """Without --vlm-processor the tokenizer step's name is looked up in the Hugging Face cache,
    offline; absent there, one line says how to provide it."""
    home = tmp_path / "hf"
    repo = home / "hub" / f"models--{TOKENIZER_NAME.replace('/', '--')}"
    revision = "e" * 40
    shutil.copytree(TOKENIZER, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    out = tmp_path / "action.safetensors"
    case = "pi05"
    command = [sys.executable, "-m", "actdistill_ros.cli", "predict", "--policy", str(FIXTURES / case / "policy"),
               "--batch", str(FIXTURES / case / "batch.safetensors"), "--task", case_task(case),
               "--noise", str(FIXTURES / case / "noise.safetensors"), "--out", str(out)]
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (load_file(str(out))["action"] - inputs(case)[2]).abs().max() < TOLERANCE
    env["HF_HOME"] = str(tmp_path / "empty")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert TOKENIZER_NAME in lines[0] and "--vlm-processor" in lines[0]


def test_seeded_noise_without_noise_file(tmp_path, capsys):
    """Without --noise the seed decides (the same seed, the same actions; not LeRobot's noise)."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        assert cli(["predict", "--policy", str(FIXTURES / "pi0" / "policy"), "--batch",
                    str(FIXTURES / "pi0" / "batch.safetensors"), "--task", case_task("pi0"), "--vlm-processor",
                    str(TOKENIZER), "--seed", "3", "--out", str(out)]) == 0
        outs.append(load_file(str(out))["action"])
    assert torch.equal(outs[0], outs[1]) and (outs[0] - inputs("pi0")[2]).abs().max() > 1e-2


# ---- bad input: one line naming it ---------------------------------------------------------------
def copy_policy(tmp_path: Path, case: str = "pi0") -> Path:
    target = tmp_path / "policy"
    shutil.copytree(FIXTURES / case / "policy", target)
    return target


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def one_line_error(tmp_path, capsys, policy: Path, *extra: str) -> str:
    code = cli(["predict", "--policy", str(policy), "--batch", str(FIXTURES / "pi0" / "batch.safetensors"),
                "--task", case_task("pi0"), "--vlm-processor", str(TOKENIZER), "--out",
                str(tmp_path / "out.safetensors"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_unsupported_config_field_is_one_line(tmp_path, capsys):
    policy = copy_policy(tmp_path)
    edit_json(policy / "config.json", lambda c: c.update(use_fancy_decoder=True))
    err = one_line_error(tmp_path, capsys, policy)
    assert "unsupported pi0 field" in err and "use_fancy_decoder" in err and "config.json" in err
    with pytest.raises(PI0ConfigError, match="use_fancy_decoder"):
        PI0Policy.load(policy, vlm_processor=TOKENIZER)


def test_bfloat16_policy_needs_float32_flag(tmp_path, capsys):
    policy = copy_policy(tmp_path)
    edit_json(policy / "config.json", lambda c: c.update(dtype="bfloat16"))
    err = one_line_error(tmp_path, capsys, policy)
    assert "bfloat16" in err and "--float32" in err
    assert one_line_error_free(tmp_path, capsys, policy, "--float32")


def one_line_error_free(tmp_path, capsys, policy: Path, *extra: str) -> bool:
    code = cli(["predict", "--policy", str(policy), "--batch", str(FIXTURES / "pi0" / "batch.safetensors"),
                "--task", case_task("pi0"), "--vlm-processor", str(TOKENIZER), "--noise",
                str(FIXTURES / "pi0" / "noise.safetensors"), "--out", str(tmp_path / "ok.safetensors"), *extra])
    actions = load_file(str(tmp_path / "ok.safetensors"))["action"] if code == 0 else None
    return actions is not None and (actions - inputs("pi0")[2]).abs().max() < TOLERANCE


def test_unsupported_processor_step_is_one_line(tmp_path, capsys):
    policy = copy_policy(tmp_path)
    edit_json(policy / "policy_preprocessor.json",
              lambda p: p["steps"].insert(2, {"registry_name": "image_crop_resize_processor", "config": {}}))
    err = one_line_error(tmp_path, capsys, policy)
    assert "image_crop_resize_processor" in err and "policy_preprocessor.json" in err


def test_wrong_tensor_shape_is_one_line(tmp_path, capsys):
    policy = copy_policy(tmp_path)
    from safetensors.torch import save_file

    tensors = load_file(str(policy / "model.safetensors"))
    name = "model.action_time_mlp_in.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(policy / "model.safetensors"))
    err = one_line_error(tmp_path, capsys, policy)
    assert "model.safetensors" in err and "action_time_mlp_in" in err and "shape" in err


def test_wrong_noise_shape_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    noise = tmp_path / "noise.safetensors"
    save_file({"noise": torch.zeros(2, 8, 32)}, str(noise))
    err = one_line_error(tmp_path, capsys, FIXTURES / "pi0" / "policy", "--noise", str(noise))
    assert "noise" in err and "[2, 8, 10]" in err


def test_published_sizes_come_from_the_shapes():
    """A published pi0 checkpoint (PaliGemma 3B: gemma_2b + SigLIP So400m at 224, gemma_300m expert)
    is sized from its tensor shapes alone, as the tiny fixtures are (shapes only: meta tensors)."""
    from actdistill_ros.policies.pi0 import PI0Config
    from actdistill_ros.policies.pi0.modeling_pi0 import ROOT, GemmaSizes, infer_sizes
    from actdistill_ros.policies.smolvla.configuration_smolvla import Feature

    def meta(*shape):
        return torch.empty(shape, device="meta")

    tensors = {ROOT + "paligemma.lm_head.weight": meta(257152, 2048)}
    for stack, width, mlp in (("paligemma.model.language_model.", 2048, 16384), ("gemma_expert.model.", 1024, 4096)):
        for layer in range(18):
            prefix = f"{ROOT}{stack}layers.{layer}."
            tensors |= {prefix + "self_attn.q_proj.weight": meta(8 * 256, width),
                        prefix + "self_attn.k_proj.weight": meta(256, width),
                        prefix + "mlp.gate_proj.weight": meta(mlp, width)}
    vision = ROOT + "paligemma.model.vision_tower.vision_model."
    tensors |= {vision + "embeddings.patch_embedding.weight": meta(1152, 3, 14, 14),
                vision + "embeddings.position_embedding.weight": meta(256, 1152)}
    tensors |= {f"{vision}encoder.layers.{i}.mlp.fc1.weight": meta(4304, 1152) for i in range(27)}
    config = PI0Config(input_features={"observation.images.top": Feature("VISUAL", (3, 224, 224)),
                                       "observation.state": Feature("STATE", (7,))},
                       output_features={"action": Feature("ACTION", (7,))})
    sizes = infer_sizes(tensors, config, "model.safetensors")
    assert sizes.vlm == GemmaSizes(2048, 18, 16384, 8, 1, 256) and sizes.expert == GemmaSizes(1024, 18, 4096, 8, 1, 256)
    assert (sizes.vocab, sizes.vision_width, sizes.vision_depth, sizes.vision_mlp_dim, sizes.image_size) == (
        257152, 1152, 27, 4304, 224)
