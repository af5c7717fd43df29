"""Serving: an OpenAI-compatible API with continuous batching (api.py, scheduler.py) and a Streamlit chat page
(webui.py). Start them with `minimind serve --model DIR` and `minimind webui --model DIR`."""
