"""Post-processors of the AI Horde's `params.post_processing`: the ESRGAN-family upscalers
(`upscalers.py`: RealESRGAN_x4plus, RealESRGAN_x2plus, RealESRGAN_x4plus_anime_6B, NMKD_Siax,
4x_AnimeSharp)."""
