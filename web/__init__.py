"""The fashionserve web app (FastAPI): try-on and hairstyles in the browser; `python -m web --help`."""
