"""Sweeps of recipes x seeds (`dasd sweep`) and their report (`dasd sweep-report`)."""
