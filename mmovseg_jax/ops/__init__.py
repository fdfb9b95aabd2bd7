"""Small numerical operations shared by models, data and evaluation."""
