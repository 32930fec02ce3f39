# Reference values for cldlr tests: an independent, loop-based implementation of
# Obuchowski (1997) clustered ROC written from the paper's formulas, plus base-R glm and prop.test.
cl <- c(0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 5, 6, 6, 7, 8, 8, 8, 9, 9, 10, 11, 11, 12, 12, 13, 13, 13)
y  <- c(0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1)
a  <- c(0.3, 0.45, 0.25, 0.72, 0.64, 0.01, 0.6, 0.68, 0.24, 0.04, 0.56, 0.83, 0.36, 0.62, 0.37, 0.11, 0.61, 0.78, 0.39, 0.41, 0.88, 0.48, 0.33, 0.28, 0.56, 0.63, 0.35, 0.78)
b  <- c(0.22, 0.61, 0.28, 0.62, 0.74, 0.14, 0.35, 0.56, 0.39, 0.3, 0.24, 0.48, 0.15, 0.09, 0.27, 0.41, 0.74, 0.89, 0.31, 0.48, 0.34, 0.01, 0.65, 0.35, 0.54, 0.56, 0.31, 0.6)
psi <- function(x, yy) ifelse(x > yy, 1, ifelse(x == yy, 0.5, 0))
terms <- function(s) {
  X <- s[y == 1]; Y <- s[y == 0]; M <- length(X); N <- length(Y)
  theta <- mean(outer(X, Y, psi))
  ids <- unique(cl); I <- length(ids)
  v10 <- numeric(I); v01 <- numeric(I); m <- numeric(I); n <- numeric(I)
  for (k in seq_along(ids)) {
    xi <- s[cl == ids[k] & y == 1]; yi <- s[cl == ids[k] & y == 0]
    m[k] <- length(xi); n[k] <- length(yi)
    v10[k] <- if (m[k] > 0) sum(sapply(xi, function(v) mean(psi(v, Y)))) else 0
    v01[k] <- if (n[k] > 0) sum(sapply(yi, function(v) mean(psi(X, v)))) else 0
  }
  list(theta = theta, x = v10 - m * theta, z = v01 - n * theta, m = m, n = n, M = M, N = N, I = I)
}
ta <- terms(a); tb <- terms(b)
cv <- function(p, q) {
  I10 <- sum(p$m > 0); I01 <- sum(p$n > 0); I <- p$I; M <- p$M; N <- p$N
  S10 <- I10 / ((I10 - 1) * M) * sum(p$x * q$x)
  S01 <- I01 / ((I01 - 1) * N) * sum(p$z * q$z)
  S11pq <- I / (I - 1) * sum(p$x * q$z); S11qp <- I / (I - 1) * sum(q$x * p$z)
  S10 / M + S01 / N + (S11pq + S11qp) / (M * N)
}
va <- cv(ta, ta); vb <- cv(tb, tb); cab <- cv(ta, tb)
z <- (ta$theta - tb$theta) / sqrt(va + vb - 2 * cab)
cat(sprintf("obuchowski auc_a=%.15g var_a=%.15g auc_b=%.15g var_b=%.15g cov=%.15g z=%.15g p=%.15g\n",
            ta$theta, va, tb$theta, vb, cab, z, 2 * pnorm(-abs(z))))
suppressMessages(library(pROC))
r <- roc(y, a, direction = "<", levels = c(0, 1), quiet = TRUE)
cat(sprintf("pROC unclustered var_a=%.15g\n", var(r, method = "delong")))
# calibration: glm intercept (offset) and slope on logit(p)
p  <- c(0.05, 0.1, 0.12, 0.2, 0.22, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.62, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.97,
        0.08, 0.15, 0.25, 0.33, 0.42, 0.48, 0.58, 0.66, 0.72, 0.88)
yc <- c(0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 1, 1)
lp <- qlogis(p)
ci <- coef(glm(yc ~ 1, offset = lp, family = binomial))
cs <- coef(glm(yc ~ lp, family = binomial))
cat(sprintf("glm intercept=%.15g slope_intercept=%.15g slope=%.15g\n", ci[1], cs[1], cs[2]))
w <- prop.test(7, 23, correct = FALSE)$conf.int
cat(sprintf("wilson 7/23 low=%.15g high=%.15g\n", w[1], w[2]))
w <- prop.test(0, 9, correct = FALSE)$conf.int
cat(sprintf("wilson 0/9 low=%.15g high=%.15g\n", w[1], w[2]))
