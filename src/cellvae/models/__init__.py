"""The user-facing models: a trained module with its data spec and attached AnnData.

:mod:`.base` holds what every model shares (prepared tensors, save/load with format versions and migrations,
JSON-safe settings); :mod:`.count_vae` (:class:`~cellvae.CountVAE`), :mod:`.image_vae`
(:class:`~cellvae.ImageVAE`) and :mod:`.autoencoder` (:class:`~cellvae.Autoencoder`) build on it.
"""
