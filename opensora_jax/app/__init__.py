"""A local web app for making videos: `python -m opensora_jax.app` (or `opensora-app`); see `app.cli`.

controls: what the page offers for the loaded model, and form → sampling config. worker: one generation at a time
through sample.py's own path (`pipelines.run`). ui: the Gradio page. cli: flags, model loading, the server.
"""
