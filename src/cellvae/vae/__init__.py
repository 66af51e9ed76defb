"""Pure torch: likelihoods, layers and the VAE modules (no AnnData, no files).

- :mod:`.distributions`: NB, ZINB, Poisson, Normal as small shape-checked classes;
- :mod:`.losses`: the fused training likelihood (log-softmax + count log-likelihood with its derivatives);
- :mod:`.likelihoods`: one object per gene likelihood that says what it is and which loss it uses;
- :mod:`.nn`: layers with covariate injection, encoders, decoders; :mod:`.module`: the scVI module;
- :mod:`.cvae`: conditional VAE modules; :mod:`.conv`: the convolutional image VAE; :mod:`.autoencoder`: the
  deterministic autoencoder baseline.
"""
