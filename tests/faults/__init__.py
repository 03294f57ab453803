"""Fault injection: damaged and hostile inputs (hostile.py), for the integrity tests and the fault suite."""
