"""The monitor's widgets: each one small, drawing from the RunModel and ChartView it is given."""
