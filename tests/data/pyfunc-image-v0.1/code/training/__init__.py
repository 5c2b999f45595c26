"""Compatible training: train a new embedding model so an old gallery needs no re-embedding.

- `components`: influence loss (BCT), orthogonal basis/OCA layer, alignment loss,
  d-Simplex fixed classifier, cosine classifier;
- `trainer`: the one loop (progress, early stopping, resumable checkpoints);
- `methods`: `train_model(method, ...)` for independent / bct / bt2 / oca / dsimplex;
- `fashion`, `nets`: the class-based protocol's data and CNNs;
- `serving`: a trained model as an MLflow pyfunc encoder, registered with lineage.
"""
