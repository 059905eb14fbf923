"""Inference with a trained adapter: load it, answer questions, export a merged model."""
