"""The gallery's vectors on disk and the FAISS indexes over them, able to serve a gallery
that holds two model versions at once (see `index.plans`)."""
