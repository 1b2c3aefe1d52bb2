import sys
def test_x():
    import edgeroute.errors
    print(sys.path[:3])
