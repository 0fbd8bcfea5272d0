"""The floor of a Ray Serve ingress: a bare FastAPI deployment that answers a constant.

``loadtests/bench_floor.py`` deploys it beside serve_app, with as many replicas as the Ingress,
so that what Ray Serve and HAProxy alone cost per request on this machine is
measured in the same minutes as serve_app's own routes. No middleware, no auth, no hop.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

api = FastAPI()


@serve.deployment(name="Floor")
@serve.ingress(api)
class Floor:
    @api.get("/ping")
    async def ping(self) -> dict[str, str]:
        return {"status": "ok"}


app = Floor.bind()
