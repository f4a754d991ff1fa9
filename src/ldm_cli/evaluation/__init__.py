"""Measuring quality: feature networks (`features`), distances between feature sets —
FID, KID, precision/recall (`distances`) — and image metrics, PSNR and SSIM
(`image_metrics`)."""
