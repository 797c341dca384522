"""Vector quantisation of the VQ first stage (taming-transformers' `VectorQuantizer2`)."""
