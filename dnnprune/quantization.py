"""Weight quantization (linear and k-means weight sharing) and its checkpoint codecs."""
