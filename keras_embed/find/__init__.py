"""What is redundant: the exact rules from the weights (`weight_rules`, with data constants),
layers linear on the data (`data_rules`), the one duplicate grouping (`grouping`), the
data-driven refit and its search (`refit`), the condense merge (`condense`), and the
monitor's view on a probe set (`probe`)."""
