"""Alert rules, their generator and the helpers their tests share."""
