# Shared by the benchmark scripts (prepended by `testhost --lib bench/lib.sh`).

# ratio_table RESULTS A B: RESULTS holds lines "<path> RESULT <metric> <value>" for paths A and
# B (several runs each); prints, per metric in first-seen order, the median of A, of B and A/B.
ratio_table() {
    awk -v a="$2" -v b="$3" '
{ path = $1; m = $3; n[path, m]++; v[path, m, n[path, m]] = $4; if (!(m in seen)) { seen[m] = 1; order[++k] = m } }
function median(path, m,    c, i, j, t, x) {
    c = n[path, m]; if (!c) return 0
    for (i = 1; i <= c; i++) t[i] = v[path, m, i]
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (t[j] < t[i]) { x = t[i]; t[i] = t[j]; t[j] = x }
    return (c % 2) ? t[(c + 1) / 2] : (t[c / 2] + t[c / 2 + 1]) / 2
}
END {
    printf "\n%-28s %12s %12s %8s\n", "metric (median of runs)", a, b, "ratio"
    for (i = 1; i <= k; i++) {
        m = order[i]; x = median(a, m); y = median(b, m)
        printf "%-28s %12.1f %12.1f %8s\n", m, x, y, (y > 0 ? sprintf("%.2f", x / y) : "n/a")
    }
}' "$1"
}
