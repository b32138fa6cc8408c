"""``recjpq serve``: an HTTP inference server with dynamic micro-batching over the fused top-k.

Needs the ``serve`` extra (``pip install recjpq[serve]``: FastAPI, uvicorn, httpx). See docs/serve.md.
"""
from recjpq.serve.app import create_app, make_server, serve
from recjpq.serve.batcher import MicroBatcher
from recjpq.serve.engine import Query, Recommendation, Recommender

__all__ = ["create_app", "make_server", "serve", "MicroBatcher", "Recommender", "Query", "Recommendation"]
