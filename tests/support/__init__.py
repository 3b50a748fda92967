"""What the tests share besides fixtures (those are in the conftest.py files):

- `stack`: a running stack (API, worker, Flower) and how to start one;
- `procs`: child processes that die with the test run, however it ends;
- `wait`: `eventually`, the one way to wait for something;
- `sse`, `openai_schema` (+ `openai_schemas/`): reading streams, checking OpenAI's shapes.
"""

from pathlib import Path

#: the repository's root
ROOT = Path(__file__).resolve().parents[2]
