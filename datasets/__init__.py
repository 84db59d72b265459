"""RLDS reading, action transforms, dataset statistics and dataset builders.

The data code knows no model: sizes (image resolution, action window) arrive as arguments.
`datasets.statistics` is TensorFlow-free so that serving and evaluation never import TF.
"""
