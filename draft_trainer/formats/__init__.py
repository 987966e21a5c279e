"""Serving layouts of a trained draft and conversions between them: `eagle3.py` (the layouts and
the conversion, pure functions), `layer_ids.py` (each engine's layer-id convention), `store.py`
(reading and writing draft directories, `to_sglang` / `to_speculators`)."""
