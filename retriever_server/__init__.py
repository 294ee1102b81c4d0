"""FAISS / BM25 retrieval service speaking the Search-R1 HTTP API (`retriever-server build|serve`)."""

import os

# OpenMP threads that spin while waiting make FAISS and torch 5–20× slower as soon as another process
# holds one of a small machine's cores (measured on 2 cores: IVF-PQ training 2.5 s → 18–51 s). Sleeping
# waits cost nothing measurable when the cores are free. Must be set before faiss/torch load OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
