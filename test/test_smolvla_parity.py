"""LeRobot SmolVLA policies run without lerobot: `actdistill predict` reproduces the actions LeRobot
0.4.4 itself computed on tiny policies it made (test/fixtures/lerobot, written by
scripts/make_lerobot_fixtures.sh), and bad inputs fail with one line naming them.

Each fixture case holds LeRobot's saved policy directory, a raw batch (two cameras of different
sizes and aspect ratios), the start noise and LeRobot's ``postprocessor(policy.predict_action_chunk(
preprocessor(batch), noise=noise))``; its case.json says what it exercises and which tiny VLM
directory (config.json + tokenizer) it uses. Two cases run partly in bfloat16 in LeRobot
(load_vlm_weights, a bfloat16 text config): those dtypes are reproduced, and match bit for bit
too. lerobot is not installed here; everything is read offline.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from actdistill_ros.cli import main as cli
from smolvla_teacher import assert_actions_match_lerobot
from actdistill_ros.policies.smolvla import ProcessorError, SmolVLAConfigError, SmolVLAPolicy
from actdistill_ros.policies.smolvla.modeling_smolvla import PrefixContext

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot"
PROCESSOR = FIXTURES / "processor"
CASES = ("cross_attn", "variants", "self_attn", "bf16_vlm", "text_bf16")
TOLERANCE = 1e-4
VLM_NAME = "actdistill-tests/tiny-smolvlm"  # the vlm_model_name of the cases that use processor/


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def case_info(case: str) -> dict:
    return json.loads((FIXTURES / case / "case.json").read_text())


def case_task(case: str) -> str:
    return case_info(case)["task"]


def case_processor(case: str) -> Path:
    return FIXTURES / case_info(case)["vlm_processor"]


def test_fixtures_cover_the_cases():
    """Every committed case is tested, and the fixtures stay small."""
    assert sorted(p.parent.name for p in FIXTURES.glob("*/case.json")) == sorted(CASES)
    smolvla_files = [f for f in FIXTURES.rglob("*") if f.is_file() and f.relative_to(FIXTURES).parts[0] != "pi0"]
    assert sum(f.stat().st_size for f in smolvla_files) < 5e6  # pi0/ is checked by test_pi0_parity.py


def predict_cli(case: str, out: Path, *extra: str) -> int:
    return cli(["predict", "--policy", str(FIXTURES / case / "policy"), "--batch",
                str(FIXTURES / case / "batch.safetensors"), "--task", case_task(case), "--out", str(out), *extra])


@pytest.mark.parametrize("case", CASES)
def test_predict_matches_lerobot(case, tmp_path, capsys):
    out = tmp_path / "action.safetensors"
    code = predict_cli(case, out, "--noise", str(FIXTURES / case / "noise.safetensors"),
                       "--vlm-processor", str(case_processor(case)))
    assert code == 0, capsys.readouterr().err
    assert_actions_match_lerobot(case, out, FIXTURES / case / "expected.safetensors", TOLERANCE)


@pytest.mark.parametrize("case", CASES)
def test_tokens_match_lerobot(case):
    """The project's transformers tokenizes the task exactly as LeRobot's (newline, padding, mask)."""
    policy = SmolVLAPolicy.load(FIXTURES / case / "policy", vlm_processor=case_processor(case))
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    tokens, mask = policy.tokenize([case_task(case)] * expected["lang_tokens"].shape[0])
    assert torch.equal(tokens, expected["lang_tokens"]) and torch.equal(mask, expected["lang_mask"])


def test_lerobot_dtypes_are_reproduced():
    """Each part runs in the dtype LeRobot ran it in (recorded by the fixture script), and
    --float32 runs everything in float32, close to but not equal to LeRobot's bfloat16 result."""
    for case in CASES:
        policy = SmolVLAPolicy.load(FIXTURES / case / "policy", vlm_processor=case_processor(case))
        model = policy.model
        ours = {"vision": model.vlm.vision_model, "connector": model.vlm.connector, "text": model.vlm.text_model,
                "expert": model.expert.norm, "projections": model.state_proj}
        got = {name: str(next(part.parameters()).dtype).removeprefix("torch.") for name, part in ours.items()}
        assert got == case_info(case)["lerobot_dtypes"], case
    case = "bf16_vlm"
    policy = SmolVLAPolicy.load(FIXTURES / case / "policy", vlm_processor=case_processor(case), float32=True)
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    actions = policy.predict_action_chunk(load_file(str(FIXTURES / case / "batch.safetensors")), case_task(case),
                                          load_file(str(FIXTURES / case / "noise.safetensors"))["noise"])
    error = (actions - load_file(str(FIXTURES / case / "expected.safetensors"))["action"]).abs().max().item()
    assert 1e-4 < error < 0.5


def test_noise_changes_actions_and_default_noise_is_seeded(tmp_path):
    """The given noise is what is sampled from (another noise, other actions); without --noise the
    seed decides."""
    case = "cross_attn"
    policy = SmolVLAPolicy.load(FIXTURES / case / "policy", vlm_processor=PROCESSOR)
    batch = load_file(str(FIXTURES / case / "batch.safetensors"))
    noise = load_file(str(FIXTURES / case / "noise.safetensors"))["noise"]
    given = policy.predict_action_chunk(batch, case_task(case), noise)
    other = policy.predict_action_chunk(batch, case_task(case), torch.flip(noise, dims=[0]))
    assert (given - other).abs().max() > 0.1
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert predict_cli(case, first, "--vlm-processor", str(PROCESSOR), "--seed", "3") == 0
    assert predict_cli(case, second, "--vlm-processor", str(PROCESSOR), "--seed", "3") == 0
    assert torch.equal(load_file(str(first))["action"], load_file(str(second))["action"])


def test_prefix_mask_layout():
    """Image and task tokens attend bidirectionally among themselves and never to the state token;
    the state sees everything valid; padding is never attended to (the 'variants' case pads the task
    to max_length)."""
    case = "variants"
    policy = SmolVLAPolicy.load(FIXTURES / case / "policy", vlm_processor=PROCESSOR)
    batch = load_file(str(FIXTURES / case / "batch.safetensors"))
    prefix, _ = policy.preprocess(batch, case_task(case))
    context: PrefixContext = prefix.context(policy.model.head_dim)
    valid = prefix.pad_masks[0]
    assert not valid.all(), "the task should be padded in this case"
    state = prefix.pad_masks.shape[1] - 1
    mask = context.mask[0]
    assert mask[state, valid].all() and not mask[:state, state].any()
    assert not mask[:, ~valid].any()
    body = valid.clone()
    body[state] = False
    assert mask[body][:, body].all()


def test_vlm_files_from_the_hugging_face_cache(tmp_path):
    """Without --vlm-processor the tokenizer and config come from the HF cache of vlm_model_name
    (offline); an empty cache fails with one line saying what is missing and how to provide it."""
    case = "self_attn"
    home = tmp_path / "hf"
    repo = home / "hub" / f"models--{VLM_NAME.replace('/', '--')}"
    revision = "f" * 40
    shutil.copytree(PROCESSOR, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    out = tmp_path / "action.safetensors"
    command = [sys.executable, "-m", "actdistill_ros.cli", "predict", "--policy", str(FIXTURES / case / "policy"),
               "--batch", str(FIXTURES / case / "batch.safetensors"), "--task", case_task(case),
               "--noise", str(FIXTURES / case / "noise.safetensors"), "--out", str(out)]
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))["action"]
    assert (load_file(str(out))["action"] - expected).abs().max() < TOLERANCE

    env["HF_HOME"] = str(tmp_path / "empty")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert VLM_NAME in lines[0] and "--vlm-processor" in lines[0] and "tokenizer" in lines[0]


def copy_policy(tmp_path: Path, case: str = "cross_attn") -> Path:
    target = tmp_path / "policy"
    shutil.copytree(FIXTURES / case / "policy", target)
    return target


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def one_line_error(tmp_path, capsys, policy: Path, *extra: str) -> str:
    case = "cross_attn"
    code = cli(["predict", "--policy", str(policy), "--batch", str(FIXTURES / case / "batch.safetensors"),
                "--task", case_task(case), "--out", str(tmp_path / "out.safetensors"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_missing_processor_dir_is_one_line(tmp_path, capsys):
    err = one_line_error(tmp_path, capsys, FIXTURES / "cross_attn" / "policy",
                         "--vlm-processor", str(tmp_path / "nowhere"))
    assert "--vlm-processor" in err and "nowhere" in err and "not a directory" in err


def test_processor_dir_without_tokenizer_is_one_line(tmp_path, capsys):
    processor = tmp_path / "processor"
    processor.mkdir()
    shutil.copy(PROCESSOR / "config.json", processor / "config.json")
    err = one_line_error(tmp_path, capsys, FIXTURES / "cross_attn" / "policy", "--vlm-processor", str(processor))
    assert "no tokenizer files" in err and str(processor) in err


def test_unsupported_config_field_is_one_line(tmp_path, capsys):
    policy = copy_policy(tmp_path)
    edit_json(policy / "config.json", lambda c: c.update(use_fancy_decoder=True))
    err = one_line_error(tmp_path, capsys, policy, "--vlm-processor", str(PROCESSOR))
    assert "unsupported SmolVLA field" in err and "use_fancy_decoder" in err
    with pytest.raises(SmolVLAConfigError, match="use_fancy_decoder"):
        SmolVLAPolicy.load(policy, vlm_processor=PROCESSOR)


def test_unsupported_config_value_is_one_line(tmp_path, capsys):
    policy = copy_policy(tmp_path)
    edit_json(policy / "config.json", lambda c: c.update(adapt_to_pi_aloha=True))
    err = one_line_error(tmp_path, capsys, policy, "--vlm-processor", str(PROCESSOR))
    assert "adapt_to_pi_aloha" in err and "not supported" in err


def test_unsupported_processor_step_is_one_line(tmp_path, capsys):
    policy = copy_policy(tmp_path)
    edit_json(policy / "policy_preprocessor.json",
              lambda p: p["steps"].insert(2, {"registry_name": "image_crop_resize_processor", "config": {}}))
    err = one_line_error(tmp_path, capsys, policy, "--vlm-processor", str(PROCESSOR))
    assert "image_crop_resize_processor" in err and "policy_preprocessor.json" in err


def test_unsupported_normalization_mode_is_one_line(tmp_path):
    policy = copy_policy(tmp_path)
    edit_json(policy / "policy_postprocessor.json",
              lambda p: p["steps"][0]["config"]["norm_map"].update(ACTION="LOG_SCALE"))
    with pytest.raises(ProcessorError, match="LOG_SCALE") as raised:
        SmolVLAPolicy.load(policy, vlm_processor=PROCESSOR)
    assert "\n" not in str(raised.value)


def test_weights_are_safetensors_only(tmp_path, capsys):
    policy = copy_policy(tmp_path)
    (policy / "model.safetensors").rename(policy / "pytorch_model.bin")
    err = one_line_error(tmp_path, capsys, policy, "--vlm-processor", str(PROCESSOR))
    assert "model.safetensors" in err and "pickle" in err


def test_wrong_vlm_config_names_the_tensor(tmp_path, capsys):
    """A VLM config that is not the policy's (here: a wider text model) fails naming a tensor."""
    processor = tmp_path / "processor"
    shutil.copytree(PROCESSOR, processor)
    edit_json(processor / "config.json", lambda c: c["text_config"].update(intermediate_size=80))
    err = one_line_error(tmp_path, capsys, FIXTURES / "cross_attn" / "policy", "--vlm-processor", str(processor))
    assert "model.safetensors" in err and "mlp" in err and "shape" in err


def test_noise_of_the_wrong_shape_is_one_line(tmp_path, capsys):
    noise = tmp_path / "noise.safetensors"
    save_file({"noise": torch.zeros(2, 8, 6)}, str(noise))
    err = one_line_error(tmp_path, capsys, FIXTURES / "cross_attn" / "policy", "--vlm-processor", str(PROCESSOR),
                         "--noise", str(noise))
    assert "noise" in err and "[2, 8, 32]" in err


def test_uint8_pixels_are_one_line(tmp_path, capsys):
    batch = load_file(str(FIXTURES / "cross_attn" / "batch.safetensors"))
    batch["observation.images.top"] = (batch["observation.images.top"] * 255).to(torch.uint8)
    path = tmp_path / "batch.safetensors"
    save_file(batch, str(path))
    code = cli(["predict", "--policy", str(FIXTURES / "cross_attn" / "policy"), "--batch", str(path), "--task", "x",
                "--out", str(tmp_path / "o.safetensors"), "--vlm-processor", str(PROCESSOR)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "observation.images.top" in err and "uint8" in err


def test_missing_camera_is_one_line(tmp_path, capsys):
    batch = load_file(str(FIXTURES / "cross_attn" / "batch.safetensors"))
    del batch["observation.images.wrist"]
    path = tmp_path / "batch.safetensors"
    save_file(batch, str(path))
    code = cli(["predict", "--policy", str(FIXTURES / "cross_attn" / "policy"), "--batch", str(path), "--task", "x",
                "--out", str(tmp_path / "o.safetensors"), "--vlm-processor", str(PROCESSOR)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "observation.images.wrist" in err


def test_predict_on_own_teacher(tmp_path, capsys):
    """`predict` also takes this project's weights: frames go to the policy in the card's camera
    order (swapping the two cameras' tensors changes the actions)."""
    from actdistill_ros.policy import Policy, create_untrained_policy

    weights = create_untrained_policy(tmp_path / "teacher", student=False, camera_names=["top", "wrist"], seed=1)
    generator = torch.Generator().manual_seed(0)
    batch = {"observation.images.top": torch.rand(2, 3, 40, 56, generator=generator),
             "observation.images.wrist": torch.rand(2, 3, 40, 56, generator=generator),
             "observation.state": torch.randn(2, 4, generator=generator)}
    path = tmp_path / "batch.safetensors"
    save_file(batch, str(path))
    out = tmp_path / "action.safetensors"
    assert cli(["predict", "--policy", str(weights), "--batch", str(path), "--task", "reach", "--out", str(out)]) == 0
    actions = load_file(str(out))["action"]
    policy = Policy.load(weights, device="cpu")
    frames = {k: (batch[k] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for k in batch if "images" in k}
    direct = np.stack([policy.predict([frames["observation.images.top"][row], frames["observation.images.wrist"][row]],
                                      "reach", batch["observation.state"][row].numpy()).actions for row in range(2)])
    assert actions.shape == (2, policy.vla.config.chunk_size, 4)
    assert np.allclose(actions.numpy(), direct, atol=1e-6)
    swapped = {**batch, "observation.images.top": batch["observation.images.wrist"],
               "observation.images.wrist": batch["observation.images.top"]}
    save_file(swapped, str(path))
    assert cli(["predict", "--policy", str(weights), "--batch", str(path), "--task", "reach", "--out", str(out)]) == 0
    assert not np.allclose(load_file(str(out))["action"].numpy(), direct, atol=1e-4)
    # Its head is deterministic: start noise is refused rather than silently ignored.
    assert cli(["predict", "--policy", str(weights), "--batch", str(path), "--task", "reach", "--out", str(out),
                "--noise", str(FIXTURES / "cross_attn" / "noise.safetensors")]) == 2
    assert "not a flow-matching policy" in capsys.readouterr().err
