"""ADM's evaluator suite: each metric against a plain numpy version of ADM's formula on synthetic
features, TF's NHWC flattening, skip reasons, and the Inception path end to end from a locally built
random weights file (plumbing, not values)."""

import numpy as np
import pytest
import torch

from ditlab.metrics.adm import (
    LOGITS_DIM,
    METRIC_NAMES,
    POOL_DIM,
    SPATIAL_DIM,
    ADMInceptionExtractor,
    ADMReference,
    Gaussian,
    InceptionFeatures,
    ReferenceSide,
    adm_reference_side,
    ditlab_reference_side,
    flatten_spatial_nhwc,
    inception_score,
    load_adm_reference,
    precision_recall,
    suite_from_features,
)
from ditlab.metrics.inception_weights import (
    inception_skeleton,
    random_inception_state_dict,
    write_random_inception_weights,
)
from ditlab.metrics.reference import ReferenceStats

pytestmark = pytest.mark.unit


# --- ADM's formulas in plain numpy (evaluations/evaluator.py) -------------------------------------


def adm_statistics(features):
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def adm_frechet(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2); tr sqrtm(A) = sum of sqrt(eigenvalues of A)."""
    diff = mu1 - mu2
    tr_covmean = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).sum().real
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def low_rank_frechet(features, mu, sigma):
    """ADM's formula for the statistics of n < D features against (mu, sigma): with S1 = C^T C / (n - 1)
    (C the centred features), S1 S2 has the non-zero eigenvalues of C S2 C^T / (n - 1), an n x n matrix."""
    features = features.astype(np.float64)
    centred = features - features.mean(0)
    small = centred @ sigma @ centred.T / (len(features) - 1)  # (n, n)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    diff = features.mean(0) - mu
    tr_s1 = (centred**2).sum() / (len(features) - 1)
    return diff @ diff + tr_s1 + np.trace(sigma) - 2 * tr_covmean


def adm_tf_spatial(feature_map_nchw):
    """What ADM does to TF's NHWC mixed_6/conv output: spatial[..., :7], then reshape([N, -1])."""
    nhwc = np.transpose(feature_map_nchw, (0, 2, 3, 1))  # the tensor TF hands over
    return nhwc[..., :7].reshape([nhwc.shape[0], -1])


def adm_inception_score(logits, split_size):
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)  # ADM: softmax(pool @ W)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def adm_precision_recall(ref, samples, k=3):
    """ManifoldEstimator: radii = (k+1)-th smallest squared distance within a set (self included);
    a point is in a manifold when within the radius of any of its points."""

    def sq_dist(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    def radii(x):
        return np.partition(sq_dist(x, x), k, axis=1)[:, k]

    d = sq_dist(samples, ref)  # (S, R)
    precision = np.mean(np.any(d <= radii(ref)[None, :], axis=1))
    recall = np.mean(np.any(d.T <= radii(samples)[None, :], axis=1))
    return float(precision), float(recall)


# --- synthetic features ----------------------------------------------------------------------------


def synthetic_set(rng, count, shift, pool_dim=8, map_shape=(9, 3, 3), classes=10):
    """Features of one synthetic image set: pool, an NCHW spatial map, logits."""
    mixing = np.eye(pool_dim) + 0.3 * rng.standard_normal((pool_dim, pool_dim))
    pool = shift + rng.standard_normal((count, pool_dim)) @ mixing
    # spatially varying mean and scale, so that the order of the flattening matters
    channels, height, width = map_shape
    ramp = np.arange(channels * height * width).reshape(map_shape) / 10.0
    feature_map = shift * ramp + rng.standard_normal((count, *map_shape)) * (1 + ramp)
    logits = 3 * rng.standard_normal((count, classes)) + shift * np.arange(classes)
    return pool, feature_map, logits


def features_of(pool, feature_map, logits):
    return InceptionFeatures(pool, flatten_spatial_nhwc(torch.from_numpy(feature_map)).numpy(), logits)


# --- the metrics on synthetic features ------------------------------------------------------------


def test_nhwc_flattening_equals_tf_order_and_differs_from_chw():
    feature_map = torch.randn(3, 10, 4, 5)
    flat = flatten_spatial_nhwc(feature_map)
    assert flat.shape == (3, 7 * 4 * 5)
    assert np.array_equal(flat.numpy(), adm_tf_spatial(feature_map.numpy()))
    n, h, w, c = 1, 2, 3, 6  # channel fastest: index (h * W + w) * 7 + c
    assert flat[n, (h * 5 + w) * 7 + c] == feature_map[n, c, h, w]
    assert not np.array_equal(flat.numpy(), feature_map[:, :7].reshape(3, -1).numpy())
    assert SPATIAL_DIM == 7 * 17 * 17 == 2023
    with pytest.raises(ValueError, match="expected \\(N, C >= 7, H, W\\)"):
        flatten_spatial_nhwc(torch.randn(2, 6, 4, 4))


def test_fid_and_sfid_equal_adm_formulas():
    rng = np.random.default_rng(0)
    sample_pool, sample_map, sample_logits = synthetic_set(rng, 200, shift=0.4)
    ref_pool, ref_map, _ = synthetic_set(rng, 300, shift=0.0)
    ref_spatial = adm_tf_spatial(ref_map)  # as ADM stores mu_s / sigma_s
    side = ReferenceSide(Gaussian.of(ref_pool), Gaussian(*adm_statistics(ref_spatial)), None, {"pool_features": "x"})
    result = suite_from_features(features_of(sample_pool, sample_map, sample_logits), side)

    expected_fid = adm_frechet(*adm_statistics(sample_pool), *adm_statistics(ref_pool))
    expected_sfid = adm_frechet(*adm_statistics(adm_tf_spatial(sample_map)), *adm_statistics(ref_spatial))
    assert result.metrics["fid"] == pytest.approx(expected_fid, rel=1e-8)
    assert result.metrics["sfid"] == pytest.approx(expected_sfid, rel=1e-8)
    assert expected_fid > 0.5 and expected_sfid > 0.5
    # a CHW flattening compares permuted coordinates with the stored NHWC statistics: another number
    chw = sample_map[:, :7].reshape(len(sample_map), -1)
    chw_sfid = adm_frechet(*adm_statistics(chw), *adm_statistics(ref_spatial))
    assert abs(chw_sfid - result.metrics["sfid"]) > 0.1 * result.metrics["sfid"]


def test_inception_score_equals_adm_formula_with_a_short_last_split():
    logits = 2.5 * np.random.default_rng(1).standard_normal((23, 12))
    ours = inception_score(logits, split_size=5)  # splits of 5, 5, 5, 5, 3
    assert ours == pytest.approx(adm_inception_score(logits, 5), rel=1e-12)
    assert ours != pytest.approx(adm_inception_score(logits, 23), rel=1e-3)  # the splits matter
    assert inception_score(logits) == pytest.approx(adm_inception_score(logits, 5000), rel=1e-12)


def test_inception_score_stays_finite_where_adm_softmax_underflows():
    logits = np.array([[0.0, 800.0, 0.0], [800.0, 0.0, 0.0], [0.0, 0.0, 800.0]])
    score = inception_score(logits)
    assert score == pytest.approx(3.0, rel=1e-9)  # three confident, distinct classes


def test_precision_recall_equal_adm_manifold_estimator_in_blocks():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((40, 6))
    samples = 1.0 + 0.6 * rng.standard_normal((50, 6))  # shifted and narrower: neither metric is 0 or 1
    expected = adm_precision_recall(ref, samples)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1 and expected[0] != expected[1]
    assert precision_recall(ref, samples) == expected
    # blocks of 7: column blocks with fewer than k + 1 points (40 = 5 * 7 + 5, 50 = 7 * 7 + 1)
    assert precision_recall(ref, samples, batch_size=7) == expected


def test_precision_recall_by_hand_on_a_line():
    """Reference 0, 1, 2, 3 with k = 3: squared radii 9, 4, 4, 9; the radius itself is inside."""
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    samples = np.array([[5.9], [6.1], [-3.0], [-3.1]])  # in (8.41 <= 9), out, in (9 <= 9), out
    precision, recall = precision_recall(ref, samples)
    assert precision == 0.5 and recall == 1.0
    with pytest.raises(ValueError, match="4 feature vectors; expected more than k=4"):
        precision_recall(ref, samples, k=4)


def test_suite_gives_every_metric_or_its_reason():
    rng = np.random.default_rng(3)
    sample_pool, sample_map, sample_logits = synthetic_set(rng, 30, shift=0.2)
    ref_pool, ref_map, _ = synthetic_set(rng, 40, shift=0.0)
    samples = features_of(sample_pool, sample_map, sample_logits)
    full = ReferenceSide(Gaussian.of(ref_pool), Gaussian.of(adm_tf_spatial(ref_map)), ref_pool)
    result = suite_from_features(samples, full)
    assert list(result.metrics) == list(METRIC_NAMES) and result.skipped == {}
    assert (result.metrics["precision"], result.metrics["recall"]) == adm_precision_recall(ref_pool, sample_pool)
    assert result.metrics["is"] == pytest.approx(adm_inception_score(sample_logits, 5000), rel=1e-12)

    stats_only = ADMReference("VIRTUAL_x.npz", None, Gaussian.of(ref_pool), None)
    partial = suite_from_features(samples, adm_reference_side(stats_only, extractor=None))
    assert set(partial.metrics) == {"fid", "is"}
    assert partial.skipped["precision"] == partial.skipped["recall"]
    assert "no arr_0 reference images" in partial.skipped["precision"]
    assert "neither mu_s/sigma_s nor reference images" in partial.skipped["sfid"]

    ours = ReferenceStats.from_features(torch.from_numpy(ref_pool), "inception", keep=40)
    own = suite_from_features(samples, ditlab_reference_side(ours))
    assert set(own.metrics) == {"fid", "is", "precision", "recall"} and "mu_s/sigma_s" in own.skipped["sfid"]
    # another feature space: the same definitions, but no sFID (Inception's mixed_6/conv)
    clf = ReferenceStats.from_features(torch.from_numpy(ref_pool), "clf", keep=0)
    on_clf = suite_from_features(samples, ditlab_reference_side(clf))
    assert set(on_clf.metrics) == {"fid", "is"} and on_clf.metrics["fid"] == result.metrics["fid"]
    assert set(on_clf.skipped) == {"sfid", "precision", "recall"} and "Inception" in on_clf.skipped["sfid"]
    # only what is asked for is measured or skipped
    asked = suite_from_features(samples, adm_reference_side(stats_only, extractor=None), ["fid", "recall"])
    assert set(asked.metrics) == {"fid"} and set(asked.skipped) == {"recall"}


def test_adm_reference_file_is_validated(tmp_path):
    np.savez(tmp_path / "half.npz", mu=np.zeros(4), arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="only one of mu/sigma"):
        load_adm_reference(tmp_path / "half.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 is float32 \\(2, 8, 8, 3\\); expected uint8"):
        load_adm_reference(tmp_path / "float.npz")
    np.savez(tmp_path / "empty.npz", labels=np.zeros(3))
    with pytest.raises(ValueError, match="neither arr_0 nor mu/sigma"):
        load_adm_reference(tmp_path / "empty.npz")
    with pytest.raises(FileNotFoundError):
        load_adm_reference(tmp_path / "missing.npz")


# --- the Inception path from a locally built random weights file ----------------------------------


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    path = write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0)
    return ADMInceptionExtractor(weights_path=str(path), batch_size=3)


def random_images(count, size, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def test_random_weights_file_has_the_real_key_set_and_is_seeded():
    skeleton = inception_skeleton().state_dict()
    state = random_inception_state_dict(seed=0)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in skeleton.items()}
    assert all(torch.equal(state[k], v) for k, v in random_inception_state_dict(seed=0).items())
    assert not torch.equal(
        state["Mixed_6d.branch1x1.conv.weight"], random_inception_state_dict(1)["Mixed_6d.branch1x1.conv.weight"]
    )


def test_extractor_runs_end_to_end_from_the_local_weights_file(extractor):
    images = random_images(4, 24, seed=0)
    block_outputs = []  # Mixed_6d's output is cat([branch1x1 (192), ...]) along channels
    handle = extractor.model.Mixed_6d.register_forward_hook(lambda m, i, out: block_outputs.append(out.clone()))
    try:
        features = extractor(images)
    finally:
        handle.remove()
    assert features.pool.shape == (4, POOL_DIM) and features.spatial.shape == (4, SPATIAL_DIM)
    assert features.logits.shape == (4, LOGITS_DIM)
    for array in (features.pool, features.spatial, features.logits):
        assert np.isfinite(array).all() and array.std() > 0
    block = torch.cat(block_outputs)  # (4, 768, 17, 17)
    assert block.shape[-2:] == (17, 17)
    assert np.allclose(features.spatial, adm_tf_spatial(block.numpy()), atol=1e-6)
    # ADM's IS logits are pool @ W without the bias: torch-fidelity's logits_unbiased
    weight = extractor.model.fc.weight.double().numpy()
    assert np.allclose(features.logits, features.pool.astype(np.float64) @ weight.T, atol=1e-4)
    grey = extractor(images[:, :1])  # one channel is repeated to RGB
    assert np.allclose(grey.pool, extractor(images[:, :1].repeat(1, 3, 1, 1)).pool)
    with pytest.raises(ValueError, match="expected a uint8 tensor"):
        extractor(images.float())


def test_adm_npz_built_here_gives_every_metric(tmp_path, extractor):
    rng = np.random.default_rng(5)
    stats_pool = rng.standard_normal((40, POOL_DIM)) * 0.2
    stats_spatial = rng.standard_normal((40, SPATIAL_DIM)) * 0.2
    ref_images = random_images(6, 16, seed=1).permute(0, 2, 3, 1).numpy()  # NHWC, as ADM stores arr_0
    arrays = {"arr_0": ref_images, "mu": stats_pool.mean(0), "sigma": np.cov(stats_pool, rowvar=False)}
    arrays.update(mu_s=stats_spatial.mean(0), sigma_s=np.cov(stats_spatial, rowvar=False))
    np.savez(tmp_path / "VIRTUAL_tiny.npz", **arrays)
    reference = load_adm_reference(tmp_path / "VIRTUAL_tiny.npz")
    samples = random_images(6, 16, seed=2)

    result = suite_from_features(extractor(samples), adm_reference_side(reference, extractor), METRIC_NAMES)
    assert result.skipped == {} and list(result.metrics) == list(METRIC_NAMES)
    assert all(np.isfinite(v) for v in result.metrics.values())

    # the file's statistics for FID/sFID (as ADM reads them), its images' features for precision/recall
    sample_features, ref_features = extractor(samples), extractor(torch.from_numpy(ref_images).permute(0, 3, 1, 2))
    expected_fid = low_rank_frechet(sample_features.pool, arrays["mu"], arrays["sigma"])
    assert result.metrics["fid"] == pytest.approx(expected_fid, rel=1e-6)
    expected_sfid = low_rank_frechet(sample_features.spatial, arrays["mu_s"], arrays["sigma_s"])
    assert result.metrics["sfid"] == pytest.approx(expected_sfid, rel=1e-6)
    assert result.metrics["is"] == pytest.approx(adm_inception_score(sample_features.logits.astype(float), 5000))
    expected_pr = adm_precision_recall(ref_features.pool.astype(float), sample_features.pool.astype(float))
    assert (result.metrics["precision"], result.metrics["recall"]) == expected_pr
