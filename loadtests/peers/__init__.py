"""The peers ``bench_peers.py`` measures serve_app against: what a user who would not pick
serve_app would write instead, doing serve_app's own work with serve_app's own parts.

* :mod:`loadtests.peers.common`: that work (bearer check, validation, one bulk SQLite
  look-up, one ``predict_proba``, serve_app's response bodies), shared by both peers;
* :mod:`loadtests.peers.fastapi_peer`: plain FastAPI + uvicorn, 2 worker processes;
* :mod:`loadtests.peers.litserve_peer`: LitServe with dynamic batching, as its docs say
  for CPU.
"""
