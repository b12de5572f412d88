"""Answer metrics. They sit below both environments (which score answers) and evaluation (which aggregates and
rescores result files), so neither imports the other for them."""
