"""Compatible training: train a new embedding model so an old gallery needs no re-embedding.

- `components`: influence loss (BCT), orthogonal basis/OCA layer, alignment loss,
  d-Simplex fixed classifier, cosine classifier;
- `trainer`: the one loop (progress, early stopping, resumable checkpoints);
- `methods`: `train_model(method, ...)` for independent / bct / bt2 / oca / dsimplex;
- `fashion`, `nets`: the class-based protocol's data and CNNs;
- `pyfunc`: a trained image model as an MLflow pyfunc encoder, registered with lineage;
- `text`: the same recipe for sentence-transformers (BT² head into v1's space, BCT
  influence over v1's document vectors, cross-model contrast, OCA alignment and
  orthogonal layer), through the library's own trainer.
"""
