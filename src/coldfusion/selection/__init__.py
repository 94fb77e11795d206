"""Choosing what to start from: rank candidate bases and intermediate tasks cheaply."""
