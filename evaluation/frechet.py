"""The Frechet distance between two Gaussians, the formula of FID (Heusel et al. 2017): one copy, for COCO's networks
(metrics.py) and the miniature's fixed features (miniature/world.py). numpy alone, so that the miniature loads nothing
else of the evaluation."""
import numpy as np


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), between N(mu1, S1) and N(mu2, S2).

    Tr((S1 S2)^(1/2)) = Tr((R S2 R)^(1/2)) with R = S1^(1/2) (S1 S2 is similar to R S2 R). R S2 R is symmetric
    positive semi-definite, so both roots come from symmetric eigendecompositions, their eigenvalues clipped at 0:
    real and finite when a covariance is rank-deficient (fewer images than feature dimensions), where the scipy
    sqrtm of the non-symmetric S1 S2 used by clean-fid can turn complex."""
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _psd_sqrt(sigma):
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
