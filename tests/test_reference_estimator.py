"""The reference protocol: paired-t pruning, NFE accounting, per-cell reproducibility."""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.reference_estimator import ReferenceSettings, classify_reference, paired_drop


def test_paired_test_drops_only_clearly_worse_classes(rng):
    base = rng.normal(1.0, 0.1, (40, 1))
    errors = np.hstack([base, base + 0.05 + rng.normal(0, 0.01, (40, 1)),  # clearly worse
                        base - 0.02 + rng.normal(0, 0.05, (40, 1)),         # tied with the best
                        base - 0.02 + rng.normal(0, 0.001, (40, 1))])      # the best
    keep = paired_drop(errors, np.ones(4, bool), 2e-3)
    assert keep.tolist() == [False, False, True, True]


def test_reference_runs_and_accounts_for_every_evaluation(generated_batch, bundle, ort_backend):
    settings = ReferenceSettings(n_trials=30, first_test=10, test_every=5, seed=3)
    sub = generated_batch.subset(np.array([0, 5, 9]))
    res = classify_reference(sub, bundle, ort_backend, settings)
    k = len(bundle.class_names)
    assert res.trials.max() <= 30
    # Every trial evaluates every class still alive: at least one class per trial, at most K.
    assert np.all(res.nfe >= res.trials) and np.all(res.nfe <= res.trials * k)
    assert np.all(res.nfe[res.trials <= 10] == res.trials[res.trials <= 10] * k)
    assert res.survived[np.arange(3), res.class_id].all()
    assert np.isfinite(res.mean_error).all()


def test_a_cells_result_does_not_depend_on_its_batch_mates(generated_batch, bundle, ort_backend):
    settings = ReferenceSettings(n_trials=25, first_test=10, test_every=5, seed=11)
    together = classify_reference(generated_batch.subset(np.array([2, 4])), bundle, ort_backend, settings)
    alone = classify_reference(generated_batch.subset(np.array([2])), bundle, ort_backend, settings)
    assert together.class_id[0] == alone.class_id[0]
    assert together.nfe[0] == alone.nfe[0]
    np.testing.assert_allclose(together.mean_error[0], alone.mean_error[0], rtol=1e-5)
