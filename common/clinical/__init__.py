"""Clinical parameters from additive per-class sums: statistics, selection (Table 1) and the SVM's clinical block."""
