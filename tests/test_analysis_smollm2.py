"""Acceptance on the embedded SmolLM2 model: calibration matches or beats the paper-style layers."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    models = pytest.importorskip("omnikv.models")
    try:
        return models.load_model("smollm2", dtype="float32", device="cpu")
    except Exception as exc:  # not installed here: scripts/setup.sh installs it
        pytest.skip(f"smollm2 not available: {exc}")


def test_calibrated_layers_cover_at_least_the_paper_choice(smollm2):
    from omnikv.analysis.capture import record_decode_attention
    from omnikv.analysis.inputs import prompts_from_task
    from omnikv.analysis.layout import score_layout
    from omnikv.analysis.report import pooled_coverage
    from omnikv.analysis.search import choose_filter_layers

    prompts = prompts_from_task(smollm2.tokenizer, "niah_single_1", 1024, num_samples=1)
    records = [record_decode_attention(smollm2.model, ids, steps=6) for _, ids in prompts]
    assert records[0].layer_ids == list(range(30))
    cov = pooled_coverage(records, 256, "max", sink=4, recent=64)
    paper = score_layout(cov, [2, 8, 18], 1)
    ours = choose_filter_layers(cov, 3, 1)  # default cap: the paper choice's 8 dense layers
    assert paper.num_dense == 8 and ours.num_dense <= 8
    assert ours.mean_sparse_coverage >= paper.mean_sparse_coverage - 1e-9
    assert ours.missed_mass <= paper.missed_mass + 1e-9
    # the exhaustive search agrees with the DP on the real matrix
    assert choose_filter_layers(cov, 3, 1, "exhaustive").missed_mass == pytest.approx(ours.missed_mass, abs=1e-9)
