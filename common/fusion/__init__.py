"""The three SVMs (Clinical, DLR, CLDLR), fitted pooled or from secure sums."""
