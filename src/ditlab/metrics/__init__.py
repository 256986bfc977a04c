"""FID and friends (torch-fidelity) and the offline classifier feature extractor."""
