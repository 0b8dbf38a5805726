"""Run reports from a real Harmony run: convergence TSV, summary JSON and the convergence plot."""

from __future__ import annotations

import io
import itertools
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from harmony_step import HarmonyConvergenceWarning, harmony_integrate
from harmony_step._step.reports import (
    CONVERGENCE_COLUMNS,
    build_summary,
    container_kind,
    convergence_figure,
    convergence_tsv,
    environment,
    plot_convergence,
    summary_json,
)
from tests.reference import SUMMARY_KEYS


@pytest.fixture(scope="module")
def harmony_uns(data_dir):
    adata = ad.read_h5ad(data_dir / "pbmc_3500" / "pbmc_3500.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonyConvergenceWarning)  # 2 rounds: not meant to settle
        harmony_integrate(
            adata, "donor", max_iter_harmony=2, max_iter_clustering=5, device="cpu", random_state=1
        )
    return adata.uns["harmony"]


def test_convergence_tsv_has_one_row_per_iteration_and_exact_values(harmony_uns):
    table = pd.read_csv(
        io.StringIO(convergence_tsv(harmony_uns)), sep="\t", float_precision="round_trip"
    )
    assert tuple(table.columns) == CONVERGENCE_COLUMNS
    iterations = harmony_uns["iterations"]
    assert len(table) == len(iterations["objective"])
    for column in CONVERGENCE_COLUMNS:
        # repr round-trips doubles exactly
        np.testing.assert_array_equal(table[column].to_numpy(), np.asarray(iterations[column]))
    assert table["round"].iloc[0] == 0
    assert table["round"].iloc[-1] == harmony_uns["n_rounds"] == 2
    assert table["round"].dtype.kind == "i"


def test_summary_has_the_contract_fields(harmony_uns, monkeypatch):
    monkeypatch.setenv("HARMONY_STEP_IMAGE", "example/image:1.0")
    metrics = {"before": {"ilisi_median": 1.2}, "after": {"ilisi_median": None}, "settings": {}}
    summary = build_summary(
        harmony_uns,
        parameters={"sigma": 0.1, "n_clusters": None},
        metrics=metrics,
        input_sha256="0" * 64,
        extra={"keys": ["donor"]},
    )
    required = SUMMARY_KEYS
    assert required <= set(summary)
    assert summary["n_rounds"] == 2
    assert summary["inner_iterations"] == [5, 5]
    assert summary["final_objective"] == harmony_uns["iterations"]["objective"][-1]
    assert summary["device"] == {
        "kind": "cpu",
        "name": harmony_uns["resolved"]["device_name"],
        "reason": harmony_uns["resolved"]["device_reason"],
    }
    assert summary["environment"]["image"] == "example/image:1.0"
    assert summary["environment"]["container"] in {"docker", "apptainer", "none"}
    assert {"numpy", "anndata", "h5py", "harmony_step"} <= set(summary["versions"])
    assert summary["keys"] == ["donor"]
    text = summary_json(summary)
    loaded = json.loads(text)
    assert loaded["parameters"]["n_clusters"] is None
    assert loaded["metrics"]["after"]["ilisi_median"] is None
    assert loaded["resolved"]["n_cells"] == 3500


def test_summary_json_turns_nan_into_null():
    assert json.loads(summary_json({"value": float("nan"), "array": np.array([1.0, np.inf])})) == {
        "value": None,
        "array": [1.0, None],
    }


def test_environment_image_defaults_to_none(monkeypatch):
    monkeypatch.delenv("HARMONY_STEP_IMAGE", raising=False)
    assert environment()["image"] == "none"


def test_container_kind_recognises_apptainer(monkeypatch):
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/harmony-step.sif")
    assert container_kind() == "apptainer"


def test_plot_is_a_png_with_two_panels(harmony_uns, tmp_path):
    from matplotlib.image import imread

    target = tmp_path / "plot.png"
    plot_convergence(harmony_uns, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(target)
    assert pixels.shape[:2] == (600, 800)
    assert pixels[..., :3].std() > 0.05  # something was drawn


def many_short_rounds(n_rounds: int) -> dict:
    """A convergence record of ``n_rounds`` rounds of one or two iterations each (labels crowd)."""
    rounds = np.repeat(np.arange(n_rounds + 1), [1] + [1 + r % 2 for r in range(n_rounds)])
    objective = 100.0 / (1.0 + np.arange(rounds.size))
    return {
        "iterations": {
            "round": rounds,
            "objective": objective,
            "kmeans": objective / 2,
            "entropy": objective / 4,
            "diversity": objective / 4,
        },
        "converged": True,
        "n_rounds": n_rounds,
    }


@pytest.mark.parametrize("n_rounds", [2, 10, 60])
def test_round_labels_never_overlap(n_rounds):
    figure = convergence_figure(many_short_rounds(n_rounds), title="pbmc: Harmony")
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    top = figure.axes[0]
    labels = [text for text in top.texts if text.get_text().startswith("r")]
    assert len(labels) == n_rounds
    shown = [text.get_window_extent(renderer) for text in labels if text.get_visible()]
    assert shown, "no round label is shown"
    assert labels[0].get_visible()
    assert all(left.x1 <= right.x0 for left, right in itertools.pairwise(shown))
    if n_rounds <= 10:
        assert len(shown) == n_rounds  # room for all of them
    assert top.get_title() == "pbmc: Harmony"
