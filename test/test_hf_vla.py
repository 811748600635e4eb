"""The hf_vla teacher family on tiny models of the real transformers classes: PaliGemma, Idefics3 and
Qwen2.5-VL by name, LLaVA and Gemma3 through the generic path. Every backbone is saved with
save_pretrained and a locally built tokenizer and loaded through the --backbone path, offline."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from actdistill_ros.cli import main as cli
from actdistill_ros.data.synthetic import DIRECTIONS, write_synthetic_demos
from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent
from actdistill_ros.policies.hf_vla import HFVLA, HFVLAConfig, UnsupportedBackbone
from actdistill_ros.policies.hf_vla.modeling_hf_vla import load_backbone
from actdistill_ros.policies.hf_vla.tiny_backbone import build_tokenizer, make_backbone
from actdistill_ros.policies.teacher import DistillableVLA
from actdistill_ros.policy import Policy, make_card, save_model
from actdistill_ros.sim.metaworld_env import MT10_TASKS
from actdistill_ros.weights import WeightsError

REPO = Path(__file__).resolve().parents[1]

NAMED = ("paligemma", "idefics3", "qwen2_5_vl")
GENERIC = ("llava", "gemma3")  # no code names these: attribute discovery must find their parts
CAMERAS = ["/cam/scene", "/cam/wrist"]
IMAGE_SIZE = {"qwen2_5_vl": 56}  # Qwen-VL takes any multiple of 28; the others have a fixed size
TEACHER_STEPS = 120  # enough for the tiny teacher's loss to fall by more than half on the toy task


def _generic_backbone(family: str, out: Path) -> Path:
    """A tiny model of a family this package has no code for, saved as a user would find it."""
    from transformers import AutoModelForImageTextToText, Gemma3Config, LlavaConfig

    tokenizer = build_tokenizer()
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, **ids)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=16)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if family == "llava":
        config = LlavaConfig(text_config=dict(model_type="llama", **text),
                             vision_config=dict(model_type="clip_vision_model", projection_dim=64, **vision),
                             image_token_index=image_token, **ids)
    else:  # sliding-window layers whose window is shorter than the sequence, and a per-layer-type rotary
        config = Gemma3Config(text_config=dict(head_dim=16, sliding_window=12, **text), vision_config=vision,
                              mm_tokens_per_image=4, image_token_index=image_token, **ids)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and one thread does not stall when other processes
    load the cores (OpenMP workers spin-waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    dirs = {family: make_backbone(family, root / family) for family in NAMED[1:]}
    assert cli(["make-backbone", "--family", "paligemma", "--out", str(root / "paligemma")]) == 0
    dirs["paligemma"] = root / "paligemma"
    for family in GENERIC:
        dirs[family] = _generic_backbone(family, root / family)
    return dirs


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _vla(backbone_dir: Path, family: str, **overrides) -> HFVLA:
    config = HFVLAConfig(**{"num_cameras": 2, "chunk_size": 4, "max_text_tokens": 8,
                            "image_size": IMAGE_SIZE.get(family, 0), **overrides})
    torch.manual_seed(0)
    return HFVLA.from_pretrained(backbone_dir, config).eval()


def _observations(vla: HFVLA, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = vla.config
    images = torch.from_numpy(rng.integers(0, 256, (batch, c.num_cameras, c.image_size, c.image_size, 3),
                                           dtype=np.uint8))
    instructions = ["push the puck to the goal", "open the drawer", "", "pick up the puck and place it at the goal"]
    return images, [instructions[i % 4] for i in range(batch)], torch.randn(batch, c.state_dim)


# ---- model -------------------------------------------------------------------------------------
def test_tokenizer_knows_every_task_word_and_reloads_offline(tmp_path, offline):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    commands = [instruction for _, instruction in MT10_TASKS.values()] + list(DIRECTIONS)
    commands.append("Please push the red block 2 cm to the left, then stop!")
    for command in commands:
        ids = reloaded(command)["input_ids"]
        assert ids == tokenizer(command)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids, command
    assert reloaded("zyzzyva")["input_ids"][1] == tokenizer.unk_token_id  # unknown words are <unk>, not noise


@pytest.mark.parametrize("family", NAMED + GENERIC)
def test_layer_by_layer_equals_the_parent_language_model(backbones, family, offline):
    vla = _vla(backbones[family], family)
    assert isinstance(vla, DistillableVLA)
    assert vla.config.adapter == (family if family in NAMED else "generic")
    images, instructions, states = _observations(vla, 4)
    with torch.no_grad():
        encoded = vla.encode(images, instructions, states)
        mask = encoded.attention_mask()
        hidden = encoded.tokens
        for index in range(vla.num_layers):
            hidden = vla.run_layer(index, hidden, mask)
        decoder = vla.language_model
        layer_masks = {t: vla.layer_attention_mask(mask, t) for t in set(vla._layer_types)}
        parent_mask = layer_masks if len(layer_masks) > 1 else layer_masks["full_attention"]
        parent = decoder(inputs_embeds=encoded.tokens, attention_mask=parent_mask,
                         position_ids=vla.position_ids).last_hidden_state
    torch.testing.assert_close(decoder.norm(hidden), parent, atol=1e-5, rtol=1e-5)
    c = vla.config
    assert encoded.tokens.shape[1] == c.num_tokens == 2 * c.image_tokens_per_camera + 8 + 1 + 4
    # Padding is masked (the empty instruction keeps only its BOS), nothing else is.
    language = encoded.segment == 1
    assert encoded.valid[2, language].sum() == 1 and encoded.valid[0, ~language].all()
    if family == "gemma3":  # the sliding layers' window is shorter than the sequence: their mask is banded
        assert "sliding_attention" in layer_masks and not torch.equal(layer_masks["sliding_attention"],
                                                                      vla.layer_attention_mask(mask))


@pytest.mark.parametrize("family", ["paligemma", "idefics3"])
def test_attention_is_prefix_lm(backbones, family, offline):
    """The image + instruction prefix never sees the state or action queries (so its features do not
    depend on them); the queries see everything; the prefix attends within itself as pretrained."""
    vla = _vla(backbones[family], family)
    images, instructions, states = _observations(vla, 2)
    with torch.no_grad():
        outputs = []
        for state in (states, states + 5.0):
            encoded = vla.encode(images, instructions, state)
            hidden = encoded.tokens
            for index in range(vla.num_layers):
                hidden = vla.run_layer(index, hidden, encoded.attention_mask())
            outputs.append(hidden)
    prefix = (encoded.segment == 0) | (encoded.segment == 1)
    torch.testing.assert_close(outputs[0][:, prefix], outputs[1][:, prefix], rtol=0, atol=0)
    assert (outputs[0][:, ~prefix] - outputs[1][:, ~prefix]).abs().amax() > 1e-3
    allowed = vla.layer_attention_mask(encoded.attention_mask())[0, 0]
    first_image, last_text = 0, int((prefix & encoded.valid[0]).nonzero().max())
    assert bool(allowed[first_image, last_text]) == (family == "paligemma")  # bidirectional vs causal prefix
    assert allowed[~prefix][:, encoded.valid[0]].all()


def test_positions_are_what_the_parent_model_computes(backbones, offline):
    paligemma = _vla(backbones["paligemma"], "paligemma")
    assert paligemma.position_ids.tolist() == [list(range(1, paligemma.config.num_tokens + 1))]  # 1-indexed
    # Qwen2.5-VL, one camera: the model's own get_rope_index over image tokens then text tokens.
    qwen = _vla(backbones["qwen2_5_vl"], "qwen2_5_vl", num_cameras=1)
    n, image = qwen.config.num_tokens, qwen.config.image_tokens_per_camera
    token_types = torch.zeros(1, n, dtype=torch.int)
    token_types[0, :image] = 1
    grid = torch.tensor([[1, 56 // 14, 56 // 14]])
    expected, _ = qwen.backbone.get_rope_index(torch.zeros(1, n, dtype=torch.long), token_types, image_grid_thw=grid)
    assert torch.equal(qwen.position_ids, expected)
    two = _vla(backbones["qwen2_5_vl"], "qwen2_5_vl")  # two cameras: two image grids, then text
    assert two.position_ids.shape == (3, 1, two.config.num_tokens)
    assert not torch.equal(two.position_ids[0, 0, :image], two.position_ids[1, 0, :image])  # 3-axis in images


@pytest.mark.parametrize("family", NAMED + GENERIC)
def test_layer_flops_equal_torch_flop_counter(backbones, family, offline):
    vla = _vla(backbones[family], family)
    text = vla.language_model.config
    if family == "paligemma":  # the test covers head_dim != width / heads and grouped-query attention
        assert text.head_dim != text.hidden_size // text.num_attention_heads
    assert text.num_key_value_heads < text.num_attention_heads
    images, instructions, states = _observations(vla, 1)
    with torch.no_grad():
        encoded = vla.encode(images, instructions, states)
        counter = FlopCounterMode(display=False)
        # The math SDPA kernel is made of matmuls the counter sees (the fused CPU kernel is not counted).
        with counter, sdpa_kernel(SDPBackend.MATH):
            for index in (0, 3, 5):
                vla.run_layer(index, encoded.tokens, encoded.attention_mask())
    assert counter.get_total_flops() == pytest.approx(3 * vla.layer_flops(encoded.tokens.shape[1]), rel=1e-9)


def test_images_must_match_the_camera_layout(backbones):
    vla = _vla(backbones["idefics3"], "idefics3")
    images, instructions, states = _observations(vla, 2)
    with pytest.raises(ValueError, match=r"\(B, 2, 64, 64, 3\)"):
        vla.encode(images[:, :1], instructions, states)
    with pytest.raises(ValueError, match="states must have shape"):
        vla.encode(images, instructions, None)


def test_config_validates_itself_and_against_the_backbone(backbones):
    with pytest.raises(ValueError, match="num_cameras"):
        HFVLAConfig(num_cameras=0)
    with pytest.raises(ValueError, match="prefix_attention"):
        HFVLAConfig(prefix_attention="sideways")
    with pytest.raises(ValueError, match="image_std"):
        HFVLAConfig(image_std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="num_layers is 3, the backbone has 8"):
        _vla(backbones["idefics3"], "idefics3", num_layers=3)
    with pytest.raises(ValueError, match="takes 64x64 images"):
        _vla(backbones["paligemma"], "paligemma", image_size=96)
    with pytest.raises(ValueError, match="multiples of 28"):
        _vla(backbones["qwen2_5_vl"], "qwen2_5_vl", image_size=60)


def test_image_statistics_come_from_the_backbones_preprocessor_config(backbones, tmp_path, offline):
    import shutil

    shutil.copytree(backbones["idefics3"], tmp_path / "idefics3")
    (tmp_path / "idefics3" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    vla = _vla(tmp_path / "idefics3", "idefics3")
    assert vla.config.image_mean == [0.1, 0.2, 0.3] and vla.config.image_std == [0.4, 0.5, 0.6]
    assert _vla(backbones["qwen2_5_vl"], "qwen2_5_vl").config.image_std[0] == pytest.approx(0.2686, abs=1e-4)


# ---- models that do not fit ----------------------------------------------------------------------
def test_a_model_without_a_vision_tower_stops_with_one_line(tmp_path, offline, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    capsys.readouterr()
    code = cli(["train-teacher", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                "--backbone", str(tmp_path / "llama")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "llama: cannot be used as an hf_vla backbone: no vision tower" in err


def test_a_decoder_without_a_routable_layer_stack_is_named(offline):
    from transformers import AutoModel, Blip2Config

    config = Blip2Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=16),
                         qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, encoder_hidden_size=32),
                         text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                          num_attention_heads=2, word_embed_proj_dim=32), num_query_tokens=2)
    with pytest.raises(UnsupportedBackbone) as info:
        HFVLA(AutoModel.from_config(config), build_tokenizer(), HFVLAConfig())
    message = str(info.value)
    assert message.startswith("blip-2: ") and "layers" in message and "\n" not in message


def test_a_path_that_is_not_a_model_is_a_clear_error(tmp_path, offline):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"--backbone {tmp_path}: cannot load") as info:
        load_backbone(tmp_path)
    assert "\n" not in str(info.value)


# ---- train-teacher, distill, weights -------------------------------------------------------------
@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_synthetic_demos(tmp_path_factory.mktemp("bags"), episodes=6, length=12, size=64, cameras=CAMERAS)


def _camera_args() -> list[str]:
    return [arg for camera in CAMERAS for arg in ("--camera-topic", camera)]


def _teacher_args(backbone: Path, demos: Path, out: Path, steps: int) -> list[str]:
    return ["train-teacher", "--data", str(demos), *_camera_args(), "--out", str(out), "--backbone", str(backbone),
            "--train-vision", "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3", "--max-text-tokens", "8",
            "--chunk-size", "4", "--action-space", "metaworld", "--device", "cpu"]


def _train_teacher(backbone: Path, demos: Path, out: Path, steps: int = TEACHER_STEPS) -> Path:
    assert cli(_teacher_args(backbone, demos, out, steps)) == 0
    return out / "teacher"


def _distill(teacher: Path, demos: Path, out: Path) -> Path:
    assert cli(["distill", "--teacher", str(teacher), "--data", str(demos), *_camera_args(), "--out", str(out),
                "--probe-steps", "4", "--distill-steps", "6", "--batch-size", "8"]) == 0
    return out / "student"


@pytest.fixture(scope="module")
def paligemma_teacher(backbones, demos, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return _train_teacher(backbones["paligemma"], demos, tmp_path_factory.mktemp("teacher"))


def test_teacher_trains_on_two_cameras_and_its_loss_falls(paligemma_teacher):
    rows = [json.loads(line) for line in (paligemma_teacher.parent / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "teacher" and "loss" in r]
    assert len(losses) == TEACHER_STEPS // 10 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    card = json.loads((paligemma_teacher / "card.json").read_text())
    assert card["family"] == "hf_vla" and card["camera_names"] == CAMERAS
    assert card["vla_config"]["num_cameras"] == 2 and card["vla_config"]["backbone_type"] == "paligemma"
    assert card["provenance"]["vision_tower"] == "trained"


def test_weights_directory_rebuilds_offline_without_pickles(paligemma_teacher, offline):
    files = sorted(str(p.relative_to(paligemma_teacher)) for p in paligemma_teacher.rglob("*") if p.is_file())
    assert files == ["backbone/config.json", "backbone/tokenizer.json", "backbone/tokenizer_config.json",
                     "card.json", "model.safetensors"]
    first = Policy.load(paligemma_teacher, device="cpu")
    second = Policy.load(paligemma_teacher / "model.safetensors", device="cpu")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (80, 100, 3), dtype=np.uint8) for _ in CAMERAS]  # resized inside
    a = first.predict(frames, "move left", np.zeros(4))
    b = second.predict(frames, "move left", np.zeros(4))
    np.testing.assert_array_equal(a.actions, b.actions)
    assert first.num_cameras == 2 and a.executed_fraction == 1.0 and a.backbone_gflops > 0
    with pytest.raises(ValueError, match="takes 2 camera"):
        first.predict(frames[0], "move left", np.zeros(4))


def test_derived_student_at_threshold_zero_equals_the_teacher(paligemma_teacher, tmp_path, offline):
    teacher = Policy.load(paligemma_teacher, device="cpu")
    student_model = RoutedStudent.derive_from(teacher.vla, RouterConfig())
    student_model.router.bias_to_keep(0.5)
    card = teacher.card
    save_model(tmp_path / "student", student_model,
               make_card(student_model, card.action_space, norm_stats=card.norm_stats, camera_names=card.camera_names))
    assert sorted(p.name for p in (tmp_path / "student" / "backbone").iterdir()) == [
        "config.json", "tokenizer.json", "tokenizer_config.json"]
    student = Policy.load(tmp_path / "student", device="cpu")
    rng = np.random.default_rng(1)
    for command in ("move up", "open the drawer"):
        frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in CAMERAS]
        state = rng.normal(size=4)
        student.threshold = 0.5
        routed = student.predict(frames, command, state)
        assert 0 < len(routed.executed_layers) < student.num_layers
        student.threshold = 0.0
        full = student.predict(frames, command, state)
        assert full.executed_layers == list(range(8))
        np.testing.assert_allclose(full.actions, teacher.predict(frames, command, state).actions, atol=1e-5)
        assert full.backbone_gflops == pytest.approx(teacher.predict(frames, command, state).backbone_gflops)


def test_distilled_student_carries_the_backbone_and_loads_offline(paligemma_teacher, demos, tmp_path, offline):
    student_dir = _distill(paligemma_teacher, demos, tmp_path / "distill")
    assert (student_dir / "backbone" / "config.json").is_file()
    student = Policy.load(student_dir, device="cpu")
    assert student.card.family == "hf_vla" and student.card.is_student and student.card.camera_names == CAMERAS
    frames = [np.zeros((64, 64, 3), np.uint8)] * 2
    out = student.predict(frames, "move down", np.zeros(4))
    assert out.actions.shape == (4, 4) and np.isfinite(out.actions).all()


@pytest.mark.parametrize("family", ["llava"])
def test_unnamed_family_goes_through_train_teacher_and_distill(backbones, demos, family, tmp_path, offline):
    teacher_dir = _train_teacher(backbones[family], demos, tmp_path / "teacher", steps=4)
    student = Policy.load(_distill(teacher_dir, demos, tmp_path / "distill"), device="cpu")
    assert student.card.vla_config["adapter"] == "generic" and student.card.vla_config["backbone_type"] == family
    out = student.predict([np.zeros((64, 64, 3), np.uint8)] * 2, "move right", np.zeros(4))
    assert np.isfinite(out.actions).all()


def test_missing_backbone_files_and_remote_code_are_clear_errors(paligemma_teacher, tmp_path, offline):
    import shutil

    copy = tmp_path / "teacher"
    shutil.copytree(paligemma_teacher, copy)
    card = json.loads((copy / "card.json").read_text())
    card["vla_config"]["trust_remote_code"] = True
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="trust_remote_code=True") as info:
        Policy.load(copy, device="cpu")
    assert "\n" not in str(info.value)
    shutil.rmtree(copy / "backbone")
    with pytest.raises(WeightsError, match="backbone: missing config.json"):
        Policy.load(copy, device="cpu")


def test_bench_runs_on_hf_weights(paligemma_teacher, capsys, offline):
    assert cli(["bench", "--teacher", str(paligemma_teacher), "--keep", "0.5", "--iters", "3", "--warmup", "1",
                "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_layers"] == 8 and result["executed_layer_fraction"] == 0.5
    assert result["flops_ratio"] == pytest.approx(2.0)


def test_a_teacher_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(backbones, demos, paligemma_teacher,
                                                                              tmp_path):
    """Killed and resumed in a subprocess, the run ends where the uninterrupted one (the fixture's) did."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "actdistill_ros.cli",
               *_teacher_args(backbones["paligemma"], demos, killed, TEACHER_STEPS), "--checkpoint-every", "10"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "teacher.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "teacher").exists()
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stderr
    expected = load_file(paligemma_teacher / "model.safetensors")
    got = load_file(killed / "teacher" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=1e-6, err_msg=name)
