"""model/tasks"""
