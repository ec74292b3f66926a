"""SparsyFed on Flower's Deployment Runtime: a ServerApp and a ClientApp around one sparsyfed config."""
