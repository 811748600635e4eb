"""The SmolVLA compute model (policies/smolvla/compute_smolvla.py) against counted forwards: the
FLOPs formulas of the vision tower, the routed prefix and one denoising step equal what
torch.utils.flop_counter.FlopCounterMode counts when the real modules run, on tiny configs of both
attention modes, with skipped layers and with an expert shorter than the VLM; the routed prefix
with every layer kept is exactly run_prefix; and `actdistill bench --smolvla tiny --json` reports
the parts separately."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from actdistill_ros.cli import main as cli
from actdistill_ros.policies.smolvla.compute_smolvla import (PUBLISHED_POLICY, PUBLISHED_TEXT, PUBLISHED_VISION,
                                                             SmolVLASizes, chunk_flops, keep_mask,
                                                             prefix_length, run_prefix_routed, smolvla_config,
                                                             smolvlm_config, tiny_smolvla_model)

def tiny_model(**policy):
    return tiny_smolvla_model("eager", **{"num_vlm_layers": 6, **policy})  # eager: the counter sees attention


def counted(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


POLICIES = {
    "cross_attn": {},
    "self_attn": dict(attention_mode="self_attn"),
    "every_3rd_self": dict(self_attn_every_n_layers=3),
    "half_expert": dict(num_expert_layers=3, self_attn_every_n_layers=1),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("keep_fraction", [1.0, 0.5, 0.25])
def test_flops_formulas_equal_a_counted_forward(name, keep_fraction):
    model = tiny_model(**POLICIES[name])
    sizes = SmolVLASizes.of(model)
    torch.manual_seed(0)
    pixels = [torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(2)]
    task_tokens = 7
    lang = torch.randint(0, 64, (1, task_tokens))
    state = torch.zeros(1, model.config.max_state_dim)
    keep = keep_mask(model.num_vlm_layers, keep_fraction)
    expected = chunk_flops(sizes, [(24, 40), (24, 40)], task_tokens, keep)

    with torch.inference_mode():
        assert counted(lambda: model.embed_image(pixels[0])) == expected.vision_per_camera[0]
        masks = [torch.ones(1, dtype=torch.bool)] * 2
        prefix = model.embed_prefix(pixels, masks, lang, torch.ones_like(lang, dtype=torch.bool), state)
        assert prefix.embeddings.shape[1] == prefix_length(sizes, [(24, 40)] * 2, task_tokens)
        state_flops = 2 * model.config.max_state_dim * model.width
        # embed_prefix = the vision tower per camera + the state projection (token lookups are free)
        assert counted(lambda: model.embed_prefix(pixels, masks, lang, torch.ones_like(lang, dtype=torch.bool),
                                                  state)) == expected.vision + state_flops
        cache_holder = {}
        assert counted(lambda: cache_holder.setdefault("cache", run_prefix_routed(model, prefix, keep))) \
            == expected.prefix - state_flops
        cache = cache_holder["cache"]
        noise = torch.randn(1, model.config.chunk_size, model.config.max_action_dim)
        time_value = torch.ones(1)
        assert counted(lambda: model.denoise_step(noise, time_value, cache)) == expected.expert_step


def test_skipping_saves_only_the_skipped_layers_and_all_kept_is_run_prefix():
    model = tiny_model()
    sizes = SmolVLASizes.of(model)
    length = 20
    full = sizes.prefix_flops(length)
    one_skipped = sizes.prefix_flops(length, [True, False, True, True, True, True])
    saved = sizes.text_layer_flops(length, True) - sizes.text_layer_flops(length, False)
    assert full - one_skipped == saved > 0
    # The last layer's output feeds nothing: keeping or skipping it costs the same.
    assert sizes.prefix_flops(length, [True] * 5 + [False]) == full
    assert sizes.prefix_flops(length, keep_mask(6, 0.2)) == full - 4 * saved  # 1 of 5 routed layers runs
    torch.manual_seed(1)
    with torch.inference_mode():
        pixels = [torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(2)]
        lang = torch.randint(0, 64, (1, 5))
        prefix = model.embed_prefix(pixels, [torch.ones(1, dtype=torch.bool)] * 2, lang,
                                    torch.ones_like(lang, dtype=torch.bool), torch.randn(1, 8))
        reference, routed = model.run_prefix(prefix), run_prefix_routed(model, prefix, None)
        for a, b in zip(reference.layers, routed.layers):
            assert torch.equal(a.key, b.key) and torch.equal(a.value, b.value)
        skipped = run_prefix_routed(model, prefix, keep_mask(6, 0.4))
        assert not torch.equal(skipped.layers[-1].key, reference.layers[-1].key)


def test_keep_masks_route_the_first_layers_as_the_student_does():
    """The last VLM layer only gives keys/values: L - 1 layers are routed, round(kappa x (L - 1)) run."""
    assert [sum(keep_mask(16, f)[:-1]) for f in (1.0, 0.75, 0.5, 0.25)] == [15, 11, 8, 4]
    assert all(keep_mask(16, f)[-1] for f in (1.0, 0.25))
    assert sum(keep_mask(9, 0.5625)[:-1]) == 4  # 4.5: round half to even, as everywhere in the project
    assert keep_mask(9, 0.5) == [i % 2 == 0 for i in range(8)] + [True]
    with pytest.raises(ValueError, match="keep fraction"):
        keep_mask(16, 0.0)


def test_published_sizes_give_the_published_shapes():
    """SmolVLM2-500M's 16 kept text layers and smolvla_base's expert, from the numbers in code
    (meta device: nothing is allocated)."""
    vlm = smolvlm_config(PUBLISHED_TEXT, PUBLISHED_VISION, 4)
    config = smolvla_config(["a", "b"], (480, 640), 6, 6, vlm_model_name="x", **PUBLISHED_POLICY)
    from actdistill_ros.policies.smolvla import SmolVLAModel

    with torch.device("meta"):
        model = SmolVLAModel(config, vlm)
    sizes = SmolVLASizes.of(model)
    assert (model.num_vlm_layers, model.width, model.expert_width, sizes.expert_intermediate) == (16, 960, 720, 2048)
    assert sizes.patches((480, 640)) == 1024 and sizes.image_tokens((480, 640)) == 64
    params = sum(p.numel() for p in model.parameters())
    assert 395e6 < params < 410e6  # docs/SMOLVLA.md: 403M without the unused lm_head
    flops = chunk_flops(sizes, [(480, 640)] * 2, 16)
    assert flops.vision > flops.prefix > flops.expert_step  # the vision tower dominates one chunk


def test_bench_smolvla_reports_the_parts(capsys):
    assert cli(["bench", "--smolvla", "tiny", "--iters", "1", "--warmup", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["by_keep_fraction"]
    assert [r["keep_fraction"] for r in rows] == [1.0, 0.75, 0.5, 0.25]
    assert rows[0]["flops_fraction"] == 1.0
    assert all(r["vision_gflops"] == rows[0]["vision_gflops"] for r in rows)
    assert all(r["expert_gflops"] == rows[0]["expert_gflops"] for r in rows)
    assert [r["prefix_gflops"] for r in rows] == sorted((r["prefix_gflops"] for r in rows), reverse=True)
    assert rows[-1]["prefix_gflops"] < rows[0]["prefix_gflops"]
    assert all(r["vision_ms"] > 0 and r["prefix_ms"] > 0 and r["expert_ms"] > 0 for r in rows)
