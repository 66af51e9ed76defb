"""Analyses of a trained model: functions of the model and an AnnData.

They read only the public model protocol (:class:`cellvae.analysis.protocol.TrainedModel`): the module, the data
spec, the attached AnnData, prepared tensors for a set of cells and a trained-check. They never import
:mod:`cellvae.models`.
"""
