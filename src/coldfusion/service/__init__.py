"""The always-on repository: `coldfusion serve REPO` over HTTP (FastAPI on uvicorn).

Contributors authenticate with their own token (`tokens.py`), pull any version as a
Hugging Face directory, push contributions against any recent base (`app.py`); the
service fuses when enough are waiting (`fuser.py`). `client.py` is the other side:
`coldfusion pull`, `coldfusion push`.
"""
