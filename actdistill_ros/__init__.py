"""ActDistill for ROS 2: distil a VLA teacher into a layer-skipping student and run it as a node."""

# The colcon-built messages install as actdistill_ros.msg in another directory; extend_path
# lets that directory and this source package serve one import name.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

__version__ = "0.1.0"
