"""The AI Horde's "alchemy" forms served here: `caption` (BLIP, caption.py), `interrogation`
(CLIP ranking of the term lists in terms/, interrogation.py) and `nsfw` (the Stable Diffusion
safety checker, models/safety.py); registry.py says where each one's weights come from."""
